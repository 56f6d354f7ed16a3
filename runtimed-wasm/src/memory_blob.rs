//! Memory blob operations (`EVP_blobOperation` with `localStore.filename == NULL`), the
//! deciding half: which step each operation takes next, in chunks of at most [`CHUNK`]
//! bytes. Pure (no guest, no file, no socket), so it is tested on its own; `host::memory_blob`
//! carries the steps out.
//!
//! sdk-broker transfers files only, and runtimed-wasm has no network, so a memory operation
//! is staged through a hidden file of the instance's workspace ([`staging_name`]), which
//! sdk-broker confines blob files to:
//!
//! * PUT: the io callback fills the file chunk by chunk, one call per `EVP_processEvent`
//!   ([`Step::Produce`]), until `blob_len` bytes are there; then the file is PUT by
//!   sdk-broker ([`Step::Forward`]) and its result ends the operation.
//! * GET: sdk-broker GETs into the file at once; once it succeeded, the file is handed to the
//!   io callback chunk by chunk, one call per `EVP_processEvent` ([`Step::Feed`]; none when
//!   the io callback is NULL, which discards the blob).
//!
//! Either ends with [`Step::Finish`]: the file is removed and the blob callback gets the
//! result, as for a file operation. The wire callback of a memory operation's transfer carries
//! [`MEMORY_TAG`] and the operation's id, so its completion event is told from a file
//! operation's (whose callback is a guest table index, a u32) with no new contract.

use std::collections::BTreeMap;

use evp_schemas::sdk::{
    self as wire, BLOB_RESULT_ERROR, BLOB_RESULT_SUCCESS, BLOB_TYPE_AZURE_BLOB, BLOB_TYPE_EVP,
    BLOB_TYPE_EVP_EXT, BLOB_TYPE_HTTP, BLOB_TYPE_HTTP_EXT, BlobOutcome, BlobReason, BlobRequest,
    EvpResult, Request,
};

use crate::session::Registered;

/// The most bytes one io callback call produces or receives. The buffer comes from the
/// guest's `malloc`, and EVP modules often run in a 256 KiB linear memory
/// (`--max-memory=262144`), so it is kept small; 16 KiB is also what EVP's curl hands a GET's
/// write callback at a time (`CURL_MAX_WRITE_SIZE`). A 3 MB blob is some 200 calls.
pub const CHUNK: u32 = 16 * 1024;

/// Memory operations one instance may have at once, as many as sdk-broker lets it have
/// transfers under way (its `MAX_LIVE_BLOBS`): beyond, `EVP_DENIED`. Bounds what is kept for
/// the PUTs that sdk-broker does not see yet.
pub const MAX_OPERATIONS: usize = 10;

/// The name of a staging file starts with this (`.evp-memory-blob-<id>`): hidden, and the
/// agent's, so leftovers of a crashed run can be recognised and removed.
pub const STAGING_PREFIX: &str = ".evp-memory-blob-";

/// Set in the `cb` of a memory operation's wire callback: a guest's callback is a u32 table
/// index, which never sets it.
pub const MEMORY_TAG: u64 = 1 << 32;

/// `ECANCELED`: the io callback answered `EVP_BLOB_IO_RESULT_ERROR` (EVP's errno for that).
pub const ECANCELED: u32 = libc::ECANCELED as u32;
/// `ENOMEM`: the guest's `malloc` gave no buffer for a chunk (EVP's errno for that).
pub const ENOMEM: u32 = libc::ENOMEM as u32;
/// `EIO`, for a failure that carries no errno of its own.
pub const EIO: u32 = libc::EIO as u32;

/// The name of operation `id`'s staging file, in the workspace.
pub fn staging_name(id: u32) -> String {
    format!("{STAGING_PREFIX}{id}")
}

/// Whether a workspace entry is a staging file.
pub fn is_staging_name(name: &str) -> bool {
    name.strip_prefix(STAGING_PREFIX)
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// The wire callback of operation `id`'s transfer.
pub fn wire_callback(id: u32) -> wire::Callback {
    wire::Callback {
        cb: MEMORY_TAG | u64::from(id),
        userdata: 0,
    }
}

/// The memory operation a completion event is for, if it is one's.
pub fn operation_of(cb: &wire::Callback) -> Option<u32> {
    if cb.cb & !u64::from(u32::MAX) != MEMORY_TAG {
        return None;
    }
    Some(cb.cb as u32)
}

/// `EVP_BLOB_OPERATION`: GET goes from the URL to the io callback, PUT the other way.
pub use evp_schemas::sdk::BlobOperation as Direction;

/// What the module asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// GET or PUT.
    pub direction: Direction,
    /// `EVP_BLOB_TYPE`.
    pub kind: u32,
    /// The request, read from guest memory.
    pub request: BlobRequest,
    /// The io callback's table index (0: NULL).
    pub io_cb: u32,
    /// `userData`, which the io callback and the blob callback both get.
    pub user: i32,
    /// The blob callback (`None`: NULL).
    pub cb: Option<Registered>,
    /// The bytes to PUT.
    pub blob_len: u32,
}

/// Why a PUT is refused at once, before anything is staged: what sdk-broker would refuse
/// when it gets the file (an unknown type, a URL that is not http(s); EVP storage has no URL,
/// the hub's storage token gives it), and a NULL io callback, which could not produce the
/// blob. A GET goes to sdk-broker at once, which answers for it.
pub fn refusal(asked: &Asked) -> Option<EvpResult> {
    if asked.direction == Direction::Get {
        return None;
    }
    if !matches!(
        asked.kind,
        BLOB_TYPE_AZURE_BLOB
            | BLOB_TYPE_EVP
            | BLOB_TYPE_HTTP
            | BLOB_TYPE_EVP_EXT
            | BLOB_TYPE_HTTP_EXT
    ) {
        return Some(EvpResult::NotSup);
    }
    let url = asked.request.url();
    let http = wire::is_http_url(url);
    let storage = matches!(asked.request, BlobRequest::Evp { .. });
    if asked.io_cb == 0 || !(http || storage) {
        return Some(EvpResult::Inval);
    }
    None
}

/// The request that has sdk-broker transfer operation `id`'s staging file `filename`.
pub fn transfer_request(
    direction: Direction,
    kind: u32,
    request: BlobRequest,
    filename: String,
    id: u32,
) -> Request {
    Request::BlobOperation {
        kind,
        op: direction.code(),
        request,
        filename,
        cb: wire_callback(id),
    }
}

/// What the host does next for one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Call the io callback for `len` bytes and write them at `offset` of the staging file
    /// (created afresh at offset 0).
    Produce {
        /// The operation.
        id: u32,
        /// The io callback.
        io_cb: u32,
        /// Its user data.
        user: i32,
        /// Where the bytes go in the file.
        offset: u64,
        /// How many (at most [`CHUNK`]).
        len: u32,
    },
    /// Have sdk-broker PUT the staging file (created, empty, if it is not there).
    Forward {
        /// The operation.
        id: u32,
        /// `EVP_BLOB_TYPE`.
        kind: u32,
        /// The module's request.
        request: BlobRequest,
    },
    /// Read at most `max` bytes at `offset` of the staging file and hand them to the io
    /// callback; nothing read is the end of the blob.
    Feed {
        /// The operation.
        id: u32,
        /// The io callback.
        io_cb: u32,
        /// Its user data.
        user: i32,
        /// Where to read.
        offset: u64,
        /// How much at most ([`CHUNK`]).
        max: u32,
    },
    /// Remove the staging file and call the blob callback: the operation is over.
    Finish {
        /// The operation.
        id: u32,
        /// The blob callback.
        cb: Option<Registered>,
        /// Its reason.
        reason: BlobReason,
        /// Its result (none is passed with EXIT).
        result: BlobOutcome,
    },
}

/// How a [`Step::Produce`] or [`Step::Feed`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// This many bytes went through the io callback (for Feed, 0: the blob ended).
    Moved(u32),
    /// The io callback answered `EVP_BLOB_IO_RESULT_ERROR` (or was no such function).
    Refused,
    /// The host failed with this errno (a file, or the guest's `malloc`).
    Failed(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// PUT: the io callback has produced this many bytes of the staging file.
    Producing { produced: u32 },
    /// sdk-broker has the transfer; its completion event comes.
    Transferring,
    /// GET: this many bytes of the staging file went to the io callback; `result` is the
    /// transfer's, for the blob callback.
    Feeding { fed: u64, result: BlobOutcome },
    /// Over: the blob callback is due.
    Finished {
        reason: BlobReason,
        result: BlobOutcome,
    },
}

#[derive(Debug, Clone)]
struct Operation {
    asked: Asked,
    /// The PUT's request, until it is forwarded.
    request: Option<BlobRequest>,
    phase: Phase,
    /// A thread is carrying out its step: no other takes one.
    busy: bool,
}

impl Operation {
    /// A failure result of this operation: `EVP_BLOB_RESULT_ERROR` with `errno`.
    fn failure(&self, errno: u32, http_status: u32) -> Phase {
        Phase::Finished {
            reason: BlobReason::Done,
            result: BlobOutcome {
                kind: self.asked.kind,
                result: BLOB_RESULT_ERROR,
                error: errno,
                http_status,
            },
        }
    }

    fn exit(&self) -> Phase {
        Phase::Finished {
            reason: BlobReason::Exit,
            result: BlobOutcome {
                kind: self.asked.kind,
                ..Default::default()
            },
        }
    }
}

/// The memory operations of one instance.
#[derive(Debug, Default)]
pub struct MemoryBlobs {
    next_id: u32,
    ops: BTreeMap<u32, Operation>,
    /// The instance was told to exit: what is not at sdk-broker ends with EXIT.
    exiting: bool,
    /// With local work waiting, `EVP_processEvent` serves it and sdk-broker's events in
    /// turns; this says sdk-broker's turn is next.
    remote_next: bool,
}

impl MemoryBlobs {
    /// Takes on an operation, with the id its staging file and transfer are known by:
    /// a PUT starts producing (or ends with EXIT when the instance is exiting), a GET waits
    /// for the transfer the host now asks of sdk-broker. `EVP_DENIED` with
    /// [`MAX_OPERATIONS`] under way.
    pub fn start(&mut self, asked: Asked) -> Result<u32, EvpResult> {
        if self.ops.len() >= MAX_OPERATIONS {
            return Err(EvpResult::Denied);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut op = Operation {
            request: (asked.direction == Direction::Put).then(|| asked.request.clone()),
            phase: match asked.direction {
                Direction::Put => Phase::Producing { produced: 0 },
                Direction::Get => Phase::Transferring,
            },
            asked,
            busy: false,
        };
        if self.exiting && op.asked.direction == Direction::Put {
            op.phase = op.exit();
        }
        self.ops.insert(id, op);
        Ok(id)
    }

    /// Forgets a GET that sdk-broker refused (the module got the refusal as the answer).
    pub fn abandon(&mut self, id: u32) {
        self.ops.remove(&id);
    }

    /// Whether some operation has a step to take now (not waiting for sdk-broker).
    pub fn has_work(&self) -> bool {
        self.ops
            .values()
            .any(|op| !op.busy && op.phase != Phase::Transferring)
    }

    /// Whether this `EVP_processEvent` serves local work first: with work waiting, every
    /// other call does, the others look at sdk-broker's events first, so neither starves.
    pub fn local_turn(&mut self) -> bool {
        if !self.has_work() {
            return false;
        }
        self.remote_next = !self.remote_next;
        self.remote_next
    }

    /// The next step of some operation, which is marked busy until its outcome is reported
    /// ([`MemoryBlobs::produced`], [`MemoryBlobs::forwarded`], [`MemoryBlobs::fed`],
    /// [`MemoryBlobs::failed`]) or, for [`Step::Finish`], it is removed
    /// ([`MemoryBlobs::finished`]).
    pub fn next_step(&mut self) -> Option<Step> {
        let exiting = self.exiting;
        let (&id, op) = self
            .ops
            .iter_mut()
            .find(|(_, op)| !op.busy && op.phase != Phase::Transferring)?;
        if exiting && matches!(op.phase, Phase::Producing { .. } | Phase::Feeding { .. }) {
            op.phase = op.exit();
        }
        op.busy = true;
        let asked = &op.asked;
        let step = match &op.phase {
            Phase::Producing { produced } if *produced < asked.blob_len => Step::Produce {
                id,
                io_cb: asked.io_cb,
                user: asked.user,
                offset: u64::from(*produced),
                len: CHUNK.min(asked.blob_len - produced),
            },
            Phase::Producing { .. } => match op.request.take() {
                Some(request) => Step::Forward {
                    id,
                    kind: asked.kind,
                    request,
                },
                None => {
                    op.phase = op.failure(EIO, 0);
                    return self.finish_step(id);
                }
            },
            Phase::Feeding { fed, .. } => Step::Feed {
                id,
                io_cb: asked.io_cb,
                user: asked.user,
                offset: *fed,
                max: CHUNK,
            },
            Phase::Finished { .. } => return self.finish_step(id),
            Phase::Transferring => return None,
        };
        Some(step)
    }

    fn finish_step(&mut self, id: u32) -> Option<Step> {
        let op = self.ops.get(&id)?;
        let Phase::Finished { reason, result } = op.phase else {
            return None;
        };
        Some(Step::Finish {
            id,
            cb: op.asked.cb,
            reason,
            result,
        })
    }

    /// The outcome of a [`Step::Produce`].
    pub fn produced(&mut self, id: u32, chunk: Chunk) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        op.busy = false;
        let Phase::Producing { produced } = op.phase else {
            return;
        };
        op.phase = match chunk {
            // The io callback always fills the buffer it is given: no progress is a fault.
            Chunk::Moved(0) => op.failure(EIO, 0),
            Chunk::Moved(n) => Phase::Producing {
                produced: produced.saturating_add(n).min(op.asked.blob_len),
            },
            Chunk::Refused => op.failure(ECANCELED, 0),
            Chunk::Failed(errno) => op.failure(errno, 0),
        };
    }

    /// sdk-broker's answer to a [`Step::Forward`]: the transfer is under way, or the
    /// operation ends with what the refusal means for its callback.
    pub fn forwarded(&mut self, id: u32, answer: EvpResult) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        op.busy = false;
        let errno = |e: i32| e as u32;
        op.phase = match answer {
            EvpResult::Ok => Phase::Transferring,
            EvpResult::ShouldExit => op.exit(),
            EvpResult::Denied => Phase::Finished {
                reason: BlobReason::Denied,
                result: BlobOutcome {
                    kind: op.asked.kind,
                    result: BLOB_RESULT_ERROR,
                    error: errno(libc::EAGAIN),
                    http_status: 0,
                },
            },
            EvpResult::Inval => op.failure(errno(libc::EINVAL), 0),
            EvpResult::NotSup => op.failure(errno(libc::EOPNOTSUPP), 0),
            EvpResult::Again => op.failure(errno(libc::EAGAIN), 0),
            _ => op.failure(EIO, 0),
        };
    }

    /// The completion event of operation `id`'s transfer. A GET that succeeded goes on to
    /// its io callback (unless that is NULL); anything else ends the operation with it.
    /// False when no such operation waits for one.
    pub fn transfer_done(&mut self, id: u32, reason: BlobReason, result: BlobOutcome) -> bool {
        let Some(op) = self.ops.get_mut(&id) else {
            return false;
        };
        if op.phase != Phase::Transferring {
            return false;
        }
        let feed = op.asked.direction == Direction::Get
            && reason == BlobReason::Done
            && result.result == BLOB_RESULT_SUCCESS
            && op.asked.io_cb != 0;
        op.phase = if feed {
            Phase::Feeding { fed: 0, result }
        } else {
            Phase::Finished { reason, result }
        };
        true
    }

    /// The outcome of a [`Step::Feed`]. A failure keeps the transfer's HTTP status.
    pub fn fed(&mut self, id: u32, chunk: Chunk) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        op.busy = false;
        let Phase::Feeding { fed, result } = op.phase else {
            return;
        };
        op.phase = match chunk {
            Chunk::Moved(0) => Phase::Finished {
                reason: BlobReason::Done,
                result,
            },
            Chunk::Moved(n) => Phase::Feeding {
                fed: fed + u64::from(n),
                result,
            },
            Chunk::Refused => op.failure(ECANCELED, result.http_status),
            Chunk::Failed(errno) => op.failure(errno, result.http_status),
        };
    }

    /// Operation `id`'s step failed on the host with `errno` before any result: it ends
    /// with `EVP_BLOB_RESULT_ERROR`.
    pub fn failed(&mut self, id: u32, errno: u32) {
        if let Some(op) = self.ops.get_mut(&id) {
            op.busy = false;
            op.phase = op.failure(errno, 0);
        }
    }

    /// The [`Step::Finish`] of operation `id` was carried out: it is gone.
    pub fn finished(&mut self, id: u32) {
        self.ops.remove(&id);
    }

    /// The instance is told to exit: what is still local (producing, feeding, and whatever
    /// starts from now on) ends with EXIT; transfers get theirs from sdk-broker.
    pub fn exit(&mut self) {
        self.exiting = true;
    }

    /// How many operations there are.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

#[cfg(test)]
mod tests;
