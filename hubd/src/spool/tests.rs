use std::time::Duration;

use super::*;

const TOPIC: &str = "v1/devices/me/telemetry";

fn limits(max_bytes: u64, instance_max_bytes: u64) -> Limits {
    Limits {
        max_bytes,
        instance_max_bytes,
        sync_every: Duration::from_secs(1),
    }
}

fn msg(instance: &str, n: usize) -> (String, Vec<u8>) {
    (
        instance.to_owned(),
        format!("{{\"{instance}/n\":{n}}}").into_bytes(),
    )
}

/// Publishes everything the spool offers (acknowledging it when `ack`); the payloads in order.
fn drain(spool: &mut Spool, ack: bool) -> Vec<String> {
    let mut out = Vec::new();
    while let Some((tag, record)) = spool.next_unsent().unwrap() {
        spool.sent(tag, &record);
        out.push(String::from_utf8(record.payload).unwrap());
        if ack {
            spool.acked(tag).unwrap();
        }
    }
    out
}

fn payloads(instance: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range
        .map(|n| String::from_utf8(msg(instance, n).1).unwrap())
        .collect()
}

fn files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[test]
fn accepted_telemetry_drains_in_order_and_leaves_nothing_once_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), Limits::default()).unwrap();
    spool
        .push_telemetry(TOPIC, (0..100).map(|n| msg("a", n)).collect())
        .unwrap();
    assert!(spool.queued_bytes() > 0);
    assert_eq!(drain(&mut spool, true), payloads("a", 0..100));
    assert_eq!(spool.queued_bytes(), 0);
    assert!(!spool.has_unsent());
}

#[test]
fn a_lost_connection_sends_again_what_was_not_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), Limits::default()).unwrap();
    spool
        .push_telemetry(TOPIC, (0..10).map(|n| msg("a", n)).collect())
        .unwrap();
    let mut tags = Vec::new();
    while let Some((tag, record)) = spool.next_unsent().unwrap() {
        spool.sent(tag, &record);
        tags.push(tag);
    }
    for tag in &tags[..4] {
        spool.acked(*tag).unwrap();
    }
    spool.rewind();
    assert_eq!(drain(&mut spool, true), payloads("a", 4..10));
    assert_eq!(spool.queued_bytes(), 0);
}

#[test]
fn a_restart_without_the_cursor_sends_everything_again_in_order_then_the_new() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut spool = Spool::open(dir.path(), limits(64 * 1024, 64 * 1024)).unwrap();
        for n in 0..2000 {
            spool.push_telemetry(TOPIC, vec![msg("a", n)]).unwrap();
        }
        // Dropped without a sync or a cursor: what a kill -9 leaves (the page cache keeps it).
    }
    let mut spool = Spool::open(dir.path(), limits(64 * 1024, 64 * 1024)).unwrap();
    spool.push_telemetry(TOPIC, vec![msg("a", 9999)]).unwrap();
    let got = drain(&mut spool, true);
    let (tail, new) = got.split_at(got.len() - 1);
    assert_eq!(new, payloads("a", 9999..10000));
    // The spool holds its newest 64 KiB: a contiguous, ordered run ending with the last.
    let first: usize = tail[0]
        .trim_end_matches('}')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(tail, payloads("a", first..2000));
}

#[test]
fn the_cursor_keeps_acknowledged_records_from_going_out_again() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut spool = Spool::open(dir.path(), Limits::default()).unwrap();
        spool
            .push_telemetry(TOPIC, (0..10).map(|n| msg("a", n)).collect())
            .unwrap();
        for _ in 0..3 {
            let (tag, r) = spool.next_unsent().unwrap().unwrap();
            spool.sent(tag, &r);
            spool.acked(tag).unwrap();
        }
        spool.sync().unwrap();
        spool.write_cursor().unwrap();
    }
    let mut spool = Spool::open(dir.path(), Limits::default()).unwrap();
    assert_eq!(drain(&mut spool, true), payloads("a", 3..10));
}

#[test]
fn a_torn_tail_is_cut_and_the_rest_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut spool = Spool::open(dir.path(), Limits::default()).unwrap();
        spool
            .push_telemetry(TOPIC, (0..5).map(|n| msg("a", n)).collect())
            .unwrap();
    }
    let seg = std::fs::read_dir(dir.path().join("telemetry"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 3).unwrap();
    let mut spool = Spool::open(dir.path(), Limits::default()).unwrap();
    spool.push_telemetry(TOPIC, vec![msg("a", 5)]).unwrap();
    let mut want = payloads("a", 0..4);
    want.extend(payloads("a", 5..6));
    assert_eq!(drain(&mut spool, true), want);
}

#[test]
fn a_full_spool_drops_its_oldest_telemetry_counted_per_instance_but_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let max = 256 * 1024;
    let mut spool = Spool::open(dir.path(), limits(max, max)).unwrap();
    assert!(
        spool
            .push_response("a", "v1/devices/me/rpc/response/1", b"{}".to_vec())
            .unwrap()
    );
    let mut n = 0;
    while !spool.dropped().contains_key("b") {
        spool
            .push_telemetry(TOPIC, vec![msg("a", n), msg("b", n)])
            .unwrap();
        n += 1;
    }
    assert!(spool.queued_bytes() <= max);
    let dropped = spool.dropped().clone();
    assert!(dropped["a"] > 0 && dropped["b"] > 0, "{dropped:?}");
    let got = drain(&mut spool, true);
    assert_eq!(got[0], "{}", "the answer survives and goes first");
    let last_a = String::from_utf8(msg("a", n - 1).1).unwrap();
    assert!(got.contains(&last_a), "the newest telemetry is kept");
    assert_eq!(
        got.len() as u64 - 1 + dropped["a"] + dropped["b"],
        2 * n as u64
    );
}

#[test]
fn an_instance_over_its_quota_loses_its_newest_and_the_others_keep_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), limits(1 << 20, 16 * 1024)).unwrap();
    for n in 0..2000 {
        spool.push_telemetry(TOPIC, vec![msg("noisy", n)]).unwrap();
    }
    spool.push_telemetry(TOPIC, vec![msg("calm", 0)]).unwrap();
    assert!(spool.dropped()["noisy"] > 0);
    assert!(!spool.dropped().contains_key("calm"));
    let got = drain(&mut spool, true);
    assert_eq!(
        got[0],
        String::from_utf8(msg("noisy", 0).1).unwrap(),
        "the oldest kept"
    );
    assert!(got.contains(&String::from_utf8(msg("calm", 0).1).unwrap()));
}

#[test]
fn segments_go_once_done_and_online_flow_needs_no_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), limits(64 * 1024, 64 * 1024)).unwrap();
    for n in 0..5000 {
        spool.push_telemetry(TOPIC, vec![msg("a", n)]).unwrap();
        drain(&mut spool, true);
    }
    assert!(files(&dir.path().join("telemetry")) <= 1);
    spool.sync().unwrap();
    assert!(!spool.needs_sync(), "acknowledged records need no fsync");
    assert_eq!(spool.queued_bytes(), 0);
    assert!(spool.dropped().is_empty());
}

#[test]
fn tags_tell_the_streams_apart() {
    for (class, seq) in [
        (Class::Response, 1),
        (Class::Telemetry, 1),
        (Class::Telemetry, 1 << 40),
    ] {
        assert_eq!(untag(tag(class, seq)), (class, seq));
    }
}
