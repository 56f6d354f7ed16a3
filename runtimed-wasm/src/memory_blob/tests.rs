use super::*;

const CB: Registered = Registered { index: 9, user: 77 };

fn asked(direction: Direction, io_cb: u32, blob_len: u32) -> Asked {
    Asked {
        direction,
        kind: BLOB_TYPE_HTTP,
        request: BlobRequest::Http {
            url: "http://h/x".into(),
        },
        io_cb,
        user: 77,
        cb: Some(CB),
        blob_len,
    }
}

fn outcome(result: u32, http_status: u32, error: u32) -> BlobOutcome {
    BlobOutcome {
        kind: BLOB_TYPE_HTTP,
        result,
        error,
        http_status,
    }
}

fn finish(id: u32, reason: BlobReason, result: BlobOutcome) -> Step {
    Step::Finish {
        id,
        cb: Some(CB),
        reason,
        result,
    }
}

/// Runs a PUT's production, every chunk moved as asked; the chunk lengths.
fn produce_all(blobs: &mut MemoryBlobs, id: u32) -> Vec<u32> {
    let mut lens = Vec::new();
    while let Some(Step::Produce { len, offset, .. }) = blobs.next_step() {
        assert_eq!(offset, lens.iter().map(|l| u64::from(*l)).sum::<u64>());
        lens.push(len);
        blobs.produced(id, Chunk::Moved(len));
    }
    lens
}

#[test]
fn a_put_is_produced_in_chunks_of_at_most_chunk_bytes_then_forwarded() {
    fn check(blob_len: u32, expect: &[u32]) {
        let mut blobs = MemoryBlobs::default();
        let id = blobs.start(asked(Direction::Put, 3, blob_len)).unwrap();
        // `produce_all` took the Forward step that ended the loop.
        assert_eq!(produce_all(&mut blobs, id), expect, "{blob_len}");
        blobs.forwarded(id, EvpResult::Ok);
        assert!(!blobs.has_work());
        assert_eq!(blobs.next_step(), None);
    }
    check(0, &[]);
    check(1, &[1]);
    check(CHUNK, &[CHUNK]);
    check(CHUNK + 1, &[CHUNK, 1]);
    let big = 3 * 1024 * 1024 + 5;
    let lens = {
        let mut blobs = MemoryBlobs::default();
        let id = blobs.start(asked(Direction::Put, 3, big)).unwrap();
        produce_all(&mut blobs, id)
    };
    assert_eq!(lens.iter().sum::<u32>(), big);
    assert!(lens.iter().all(|l| *l <= CHUNK));
    assert_eq!(lens.last(), Some(&5));
}

#[test]
fn a_produced_put_is_forwarded_with_its_request_and_its_result_ends_it() {
    let mut blobs = MemoryBlobs::default();
    let id = blobs.start(asked(Direction::Put, 3, 10)).unwrap();
    assert!(matches!(
        blobs.next_step(),
        Some(Step::Produce { len: 10, .. })
    ));
    // Busy: no second step while the first is carried out.
    assert_eq!(blobs.next_step(), None);
    blobs.produced(id, Chunk::Moved(10));
    assert_eq!(
        blobs.next_step(),
        Some(Step::Forward {
            id,
            kind: BLOB_TYPE_HTTP,
            request: asked(Direction::Put, 3, 10).request
        })
    );
    blobs.forwarded(id, EvpResult::Ok);
    let done = outcome(BLOB_RESULT_SUCCESS, 201, 0);
    assert!(blobs.transfer_done(id, BlobReason::Done, done));
    assert_eq!(blobs.next_step(), Some(finish(id, BlobReason::Done, done)));
    blobs.finished(id);
    assert!(blobs.is_empty());
    // A second completion for it is not ours any more.
    assert!(!blobs.transfer_done(id, BlobReason::Done, done));
}

#[test]
fn an_io_callback_error_or_a_host_failure_ends_a_put_before_any_transfer() {
    fn check(chunk: Chunk, errno: u32) {
        let mut blobs = MemoryBlobs::default();
        let id = blobs.start(asked(Direction::Put, 3, 2 * CHUNK)).unwrap();
        blobs.next_step();
        blobs.produced(id, Chunk::Moved(CHUNK));
        blobs.next_step();
        blobs.produced(id, chunk);
        assert_eq!(
            blobs.next_step(),
            Some(finish(
                id,
                BlobReason::Done,
                outcome(BLOB_RESULT_ERROR, 0, errno)
            )),
            "{chunk:?}"
        );
    }
    check(Chunk::Refused, ECANCELED);
    check(Chunk::Failed(ENOMEM), ENOMEM);
    check(Chunk::Moved(0), EIO);
}

#[test]
fn a_refused_forward_is_the_callback_of_the_refusal() {
    fn check(answer: EvpResult, reason: BlobReason, errno: u32) {
        let mut blobs = MemoryBlobs::default();
        let id = blobs.start(asked(Direction::Put, 3, 0)).unwrap();
        assert!(matches!(blobs.next_step(), Some(Step::Forward { .. })));
        blobs.forwarded(id, answer);
        let Some(Step::Finish {
            reason: r, result, ..
        }) = blobs.next_step()
        else {
            panic!("{answer:?} did not end the operation");
        };
        assert_eq!((r, result.error), (reason, errno), "{answer:?}");
    }
    check(EvpResult::ShouldExit, BlobReason::Exit, 0);
    check(EvpResult::Denied, BlobReason::Denied, libc::EAGAIN as u32);
    check(EvpResult::Inval, BlobReason::Done, libc::EINVAL as u32);
    check(EvpResult::Again, BlobReason::Done, libc::EAGAIN as u32);
    check(EvpResult::Error, BlobReason::Done, EIO);
}

#[test]
fn a_get_that_succeeded_is_fed_to_its_io_callback_until_the_file_ends() {
    let mut blobs = MemoryBlobs::default();
    let id = blobs.start(asked(Direction::Get, 4, 0)).unwrap();
    // Waiting for sdk-broker: nothing to do here.
    assert!(!blobs.has_work());
    assert_eq!(blobs.next_step(), None);
    let ok = outcome(BLOB_RESULT_SUCCESS, 200, 0);
    assert!(blobs.transfer_done(id, BlobReason::Done, ok));
    let mut offsets = Vec::new();
    for n in [CHUNK, 100, CHUNK] {
        let Some(Step::Feed {
            offset, max, io_cb, ..
        }) = blobs.next_step()
        else {
            panic!("not fed");
        };
        assert_eq!((max, io_cb), (CHUNK, 4));
        offsets.push(offset);
        blobs.fed(id, Chunk::Moved(n));
    }
    assert_eq!(offsets, [0, u64::from(CHUNK), u64::from(CHUNK) + 100]);
    blobs.next_step();
    blobs.fed(id, Chunk::Moved(0));
    assert_eq!(blobs.next_step(), Some(finish(id, BlobReason::Done, ok)));
}

#[test]
fn a_get_ends_without_feeding_when_it_failed_or_discards() {
    let ok = outcome(BLOB_RESULT_SUCCESS, 200, 0);
    let http = outcome(2, 404, 0);
    for (io_cb, reason, result) in [
        (0, BlobReason::Done, ok),
        (4, BlobReason::Done, http),
        (4, BlobReason::Exit, BlobOutcome::default()),
    ] {
        let mut blobs = MemoryBlobs::default();
        let id = blobs.start(asked(Direction::Get, io_cb, 0)).unwrap();
        blobs.transfer_done(id, reason, result);
        assert_eq!(blobs.next_step(), Some(finish(id, reason, result)));
    }
}

#[test]
fn an_io_callback_error_ends_a_get_with_ecanceled_and_its_status() {
    let mut blobs = MemoryBlobs::default();
    let id = blobs.start(asked(Direction::Get, 4, 0)).unwrap();
    blobs.transfer_done(id, BlobReason::Done, outcome(BLOB_RESULT_SUCCESS, 200, 0));
    blobs.next_step();
    blobs.fed(id, Chunk::Refused);
    assert_eq!(
        blobs.next_step(),
        Some(finish(
            id,
            BlobReason::Done,
            outcome(BLOB_RESULT_ERROR, 200, ECANCELED)
        ))
    );
}

#[test]
fn exiting_ends_local_work_with_exit_and_leaves_transfers_to_sdk_broker() {
    let mut blobs = MemoryBlobs::default();
    let producing = blobs.start(asked(Direction::Put, 3, 10)).unwrap();
    let transferring = blobs.start(asked(Direction::Get, 4, 0)).unwrap();
    let feeding = blobs.start(asked(Direction::Get, 4, 0)).unwrap();
    blobs.transfer_done(feeding, BlobReason::Done, outcome(0, 200, 0));
    blobs.exit();
    let exit = |id| finish(id, BlobReason::Exit, BlobOutcome::default());
    let exit_http = |id| {
        finish(
            id,
            BlobReason::Exit,
            BlobOutcome {
                kind: BLOB_TYPE_HTTP,
                ..Default::default()
            },
        )
    };
    assert_eq!(blobs.next_step(), Some(exit_http(producing)));
    blobs.finished(producing);
    assert_eq!(blobs.next_step(), Some(exit_http(feeding)));
    blobs.finished(feeding);
    assert_eq!(blobs.next_step(), None);
    // A PUT started now ends at once.
    let late = blobs.start(asked(Direction::Put, 3, 10)).unwrap();
    assert_eq!(blobs.next_step(), Some(exit_http(late)));
    blobs.finished(late);
    // sdk-broker's EXIT for the transfer ends it.
    blobs.transfer_done(transferring, BlobReason::Exit, BlobOutcome::default());
    assert_eq!(blobs.next_step(), Some(exit(transferring)));
}

#[test]
fn at_most_max_operations_are_taken_on() {
    let mut blobs = MemoryBlobs::default();
    for _ in 0..MAX_OPERATIONS {
        blobs.start(asked(Direction::Get, 4, 0)).unwrap();
    }
    assert_eq!(
        blobs.start(asked(Direction::Get, 4, 0)),
        Err(EvpResult::Denied)
    );
    blobs.abandon(3);
    assert_eq!(blobs.len(), MAX_OPERATIONS - 1);
    assert!(blobs.start(asked(Direction::Put, 3, 1)).is_ok());
}

#[test]
fn local_work_and_sdk_broker_take_turns() {
    let mut blobs = MemoryBlobs::default();
    assert!(!blobs.local_turn());
    blobs.start(asked(Direction::Put, 3, 10)).unwrap();
    let turns: Vec<bool> = (0..4).map(|_| blobs.local_turn()).collect();
    assert_eq!(turns, [true, false, true, false]);
}

#[test]
fn a_put_needs_a_served_type_an_http_url_and_an_io_callback() {
    let put = asked(Direction::Put, 3, 10);
    assert_eq!(refusal(&put), None);
    assert_eq!(
        refusal(&Asked {
            io_cb: 0,
            ..put.clone()
        }),
        Some(EvpResult::Inval)
    );
    let ftp = Asked {
        request: BlobRequest::Http {
            url: "ftp://h/x".into(),
        },
        ..put.clone()
    };
    assert_eq!(refusal(&ftp), Some(EvpResult::Inval));
    assert_eq!(
        refusal(&Asked {
            kind: 9,
            ..put.clone()
        }),
        Some(EvpResult::NotSup)
    );
    // EVP storage: the hub's storage token gives the URL.
    let storage = Asked {
        kind: 3,
        request: BlobRequest::Evp {
            remote_name: "r".into(),
            storage_name: None,
        },
        ..put.clone()
    };
    assert_eq!(refusal(&storage), None);
    // A GET is sdk-broker's to refuse; a NULL io callback discards.
    assert_eq!(refusal(&asked(Direction::Get, 0, 0)), None);
}

#[test]
fn memory_callbacks_are_told_from_guest_callbacks_on_the_wire() {
    assert_eq!(operation_of(&wire_callback(0)), Some(0));
    assert_eq!(operation_of(&wire_callback(u32::MAX)), Some(u32::MAX));
    let guest = crate::session::wire_callback(-1, 5);
    assert_eq!(operation_of(&guest), None);
    let other = wire::Callback {
        cb: 3 << 32,
        userdata: 0,
    };
    assert_eq!(operation_of(&other), None);
}

#[test]
fn staging_files_have_a_recognisable_name() {
    assert_eq!(staging_name(12), ".evp-memory-blob-12");
    assert!(is_staging_name(&staging_name(0)));
    for other in [
        ".evp-memory-blob-",
        ".evp-memory-blob-1x",
        "evp-memory-blob-1",
        "a",
    ] {
        assert!(!is_staging_name(other), "{other}");
    }
}

#[test]
fn the_transfer_request_names_the_staging_file_and_the_operation() {
    let r = transfer_request(
        Direction::Get,
        BLOB_TYPE_HTTP,
        BlobRequest::Http {
            url: "http://h".into(),
        },
        "/w/.evp-memory-blob-4".into(),
        4,
    );
    let Request::BlobOperation {
        op, filename, cb, ..
    } = r
    else {
        panic!()
    };
    assert_eq!((op, filename.as_str()), (0, "/w/.evp-memory-blob-4"));
    assert_eq!(operation_of(&cb), Some(4));
}
