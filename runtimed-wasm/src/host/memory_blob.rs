//! Memory blob operations on the host: the steps [`crate::memory_blob`] decides, carried out.
//! The io callback is called with a buffer from the guest's `malloc` (freed after it), each
//! chunk is written to or read from the operation's staging file in the workspace, transfers
//! are asked of sdk-broker like a file operation's, and the blob callback gets the result at
//! the end: at most one guest callback per `EVP_processEvent`, and never more than one chunk
//! of a blob in memory. The staging file is removed when the operation ends, whatever the
//! end; [`remove_staging_files`] sweeps what a run left behind (at an instance's start and
//! end).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use evp_schemas::sdk::{BlobOutcome, BlobReason, EvpResult};
use tracing::warn;
use wasmtime::Caller;

use super::{HostState, allocate, call_io_callback, code, hand_in, release, with_memory};
use crate::guest;
use crate::memory_blob::{self, Asked, Chunk, Direction, EIO, ENOMEM, Step};

/// `EFAULT`: the buffer the io callback filled could not be read back.
const EFAULT: u32 = libc::EFAULT as u32;

/// Why a staging file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// A chunk could not be written.
    #[error("writing {len} bytes at offset {offset} of the staging file {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// How much.
        len: usize,
        /// Why.
        source: std::io::Error,
    },
    /// A chunk could not be read.
    #[error("reading at offset {offset} of the staging file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// Why.
        source: std::io::Error,
    },
    /// The file could not be created.
    #[error("creating the staging file {}: {source}", path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file could not be removed.
    #[error("removing the staging file {}: {source}", path.display())]
    Remove {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The workspace could not be listed.
    #[error("listing the workspace {} for staging files: {source}", path.display())]
    List {
        /// The workspace.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl StagingError {
    /// The errno the module's blob result carries for it.
    fn errno(&self) -> u32 {
        let (Self::Write { source, .. }
        | Self::Read { source, .. }
        | Self::Create { source, .. }
        | Self::Remove { source, .. }
        | Self::List { source, .. }) = self;
        source
            .raw_os_error()
            .and_then(|e| u32::try_from(e).ok())
            .unwrap_or(EIO)
    }
}

/// The staging file of operation `id`.
fn staging_path(workspace: &Path, id: u32) -> PathBuf {
    workspace.join(memory_blob::staging_name(id))
}

/// Writes `bytes` at `offset` of the file, created afresh at offset 0.
fn write_chunk(path: &Path, offset: u64, bytes: &[u8]) -> Result<(), StagingError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(offset == 0)
        .open(path)
        .and_then(|f| f.write_all_at(bytes, offset))
        .map_err(|source| StagingError::Write {
            path: path.to_owned(),
            offset,
            len: bytes.len(),
            source,
        })
}

/// Up to `max` bytes at `offset` of the file; none at its end.
fn read_chunk(path: &Path, offset: u64, max: u32) -> Result<Vec<u8>, StagingError> {
    let failed = |source| StagingError::Read {
        path: path.to_owned(),
        offset,
        source,
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let mut buf = vec![0u8; max as usize];
    let n = file.read_at(&mut buf, offset).map_err(failed)?;
    buf.truncate(n);
    Ok(buf)
}

/// Makes sure the file exists (an empty PUT never wrote a chunk).
fn ensure_exists(path: &Path) -> Result<(), StagingError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map(drop)
        .map_err(|source| StagingError::Create {
            path: path.to_owned(),
            source,
        })
}

/// Removes the file; one that is not there is fine (a refused GET never made it).
fn remove_staging(path: &Path) -> Result<(), StagingError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StagingError::Remove {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Removes every staging file of `workspace` (none there, or no workspace, is fine): the
/// leftovers of a run that ended with operations under way. How many were removed.
pub fn remove_staging_files(workspace: &Path) -> Result<usize, StagingError> {
    let entries = match std::fs::read_dir(workspace) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(StagingError::List {
                path: workspace.to_owned(),
                source,
            });
        }
    };
    let mut removed = 0;
    let mut first_error = None;
    for entry in entries {
        let entry = entry.map_err(|source| StagingError::List {
            path: workspace.to_owned(),
            source,
        })?;
        if !entry
            .file_name()
            .to_str()
            .is_some_and(memory_blob::is_staging_name)
        {
            continue;
        }
        match remove_staging(&entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(removed), Err)
}

/// `EVP_blobOperation` of a memory operation, checked and read: its answer. A PUT is taken
/// on (`EVP_OK`; its io callback runs in the next `EVP_processEvent` calls); a GET is asked
/// of sdk-broker at once, into the staging file, and sdk-broker's answer is the module's, as
/// for a file.
pub(super) fn start(caller: &mut Caller<'_, HostState>, asked: Asked) -> i32 {
    if let Some(refused) = memory_blob::refusal(&asked) {
        return code(refused);
    }
    let workspace = PathBuf::from(&caller.data().workspace);
    let (direction, kind, request) = (asked.direction, asked.kind, asked.request.clone());
    // Registered before it is sent, under the session lock: another thread of the module may
    // be the one that receives its completion.
    let mut sdk = caller.data().sdk();
    let id = match sdk.memory_blobs.start(asked) {
        Ok(id) => id,
        Err(refused) => return code(refused),
    };
    if direction == Direction::Put {
        return code(EvpResult::Ok);
    }
    let filename = staging_path(&workspace, id).to_string_lossy().into_owned();
    let request = memory_blob::transfer_request(direction, kind, request, filename, id);
    let answer = sdk.simple(&request);
    if answer != EvpResult::Ok {
        sdk.memory_blobs.abandon(id);
    }
    code(answer)
}

/// Carries out memory operation steps until one called into the guest (`Some(EVP_OK)`: it was
/// this `EVP_processEvent`'s event) or none is left to take now (`None`).
pub(super) fn run_steps(caller: &mut Caller<'_, HostState>) -> wasmtime::Result<Option<i32>> {
    loop {
        let Some(step) = caller.data().sdk().memory_blobs.next_step() else {
            return Ok(None);
        };
        if run(caller, step)? {
            return Ok(Some(code(EvpResult::Ok)));
        }
    }
}

/// The completion event of memory operation `id`'s transfer, then its next step (the first
/// chunk of a GET, or the blob callback).
pub(super) fn transfer_done(
    caller: &mut Caller<'_, HostState>,
    id: u32,
    reason: BlobReason,
    result: BlobOutcome,
) -> wasmtime::Result<i32> {
    if !caller
        .data()
        .sdk()
        .memory_blobs
        .transfer_done(id, reason, result)
    {
        warn!("a blob completion came for memory operation {id}, which waits for none");
    }
    Ok(run_steps(caller)?.unwrap_or(code(EvpResult::Ok)))
}

/// Carries out one step; whether it called into the guest.
fn run(caller: &mut Caller<'_, HostState>, step: Step) -> wasmtime::Result<bool> {
    let workspace = PathBuf::from(&caller.data().workspace);
    match step {
        Step::Produce {
            id,
            io_cb,
            user,
            offset,
            len,
        } => {
            let path = staging_path(&workspace, id);
            let chunk = produce(caller, &path, io_cb, (user, offset, len))?;
            caller.data().sdk().memory_blobs.produced(id, chunk);
            Ok(chunk != Chunk::Failed(ENOMEM))
        }
        Step::Forward { id, kind, request } => {
            let path = staging_path(&workspace, id);
            let mut sdk = caller.data().sdk();
            match ensure_exists(&path) {
                Ok(()) => {
                    let filename = path.to_string_lossy().into_owned();
                    let request =
                        memory_blob::transfer_request(Direction::Put, kind, request, filename, id);
                    let answer = sdk.simple(&request);
                    sdk.memory_blobs.forwarded(id, answer);
                }
                Err(e) => {
                    warn!("memory blob PUT {id} failed: {e}");
                    sdk.memory_blobs.failed(id, e.errno());
                }
            }
            Ok(false)
        }
        Step::Feed {
            id,
            io_cb,
            user,
            offset,
            max,
        } => {
            let path = staging_path(&workspace, id);
            let chunk = feed(caller, &path, io_cb, (user, offset, max))?;
            caller.data().sdk().memory_blobs.fed(id, chunk);
            Ok(matches!(chunk, Chunk::Moved(1..) | Chunk::Refused))
        }
        Step::Finish {
            id,
            cb,
            reason,
            result,
        } => {
            if let Err(e) = remove_staging(&staging_path(&workspace, id)) {
                warn!("{e}");
            }
            caller.data().sdk().memory_blobs.finished(id);
            super::events::blob_done(caller, cb, reason.code(), result)?;
            Ok(true)
        }
    }
}

/// One PUT chunk: the io callback fills a guest buffer of `len` bytes, which goes to the
/// file at `offset`.
fn produce(
    caller: &mut Caller<'_, HostState>,
    path: &Path,
    io_cb: u32,
    (user, offset, len): (i32, u64, u32),
) -> wasmtime::Result<Chunk> {
    let Some(buf) = allocate(caller, len as usize)? else {
        return Ok(no_buffer(len as usize));
    };
    // `len` is at most memory_blob::CHUNK, so it is an i32.
    let answer = call_io_callback(caller, io_cb, (buf, len as i32, user))?;
    let chunk = if io_succeeded(io_cb, answer) {
        match with_memory(caller, |m| guest::bytes(&*m, buf as u32, len))? {
            Ok(bytes) => match write_chunk(path, offset, &bytes) {
                Ok(()) => Chunk::Moved(len),
                Err(e) => {
                    warn!("{e}");
                    Chunk::Failed(e.errno())
                }
            },
            Err(e) => {
                warn!("the blob chunk the io callback filled cannot be read: {e}");
                Chunk::Failed(EFAULT)
            }
        }
    } else {
        Chunk::Refused
    };
    release(caller, buf)?;
    Ok(chunk)
}

/// Whether the io callback answered `EVP_BLOB_IO_RESULT_SUCCESS`; `None` (no such function)
/// is a failure, as in EVP.
fn io_succeeded(io_cb: u32, answer: Option<i32>) -> bool {
    if answer.is_none() {
        warn!("blob io callback {io_cb} is not a function (i32, i32, i32) -> i32");
    }
    answer == Some(0)
}

/// The guest's `malloc` gave no buffer for a chunk of `len` bytes.
fn no_buffer(len: usize) -> Chunk {
    warn!("the module's malloc returned NULL for a blob chunk of {len} bytes");
    Chunk::Failed(ENOMEM)
}

/// One GET chunk: up to `max` bytes at `offset` of the file, handed to the io callback in a
/// guest buffer; `Moved(0)` at the end of the file.
fn feed(
    caller: &mut Caller<'_, HostState>,
    path: &Path,
    io_cb: u32,
    (user, offset, max): (i32, u64, u32),
) -> wasmtime::Result<Chunk> {
    let bytes = match read_chunk(path, offset, max) {
        Ok(bytes) => bytes,
        Err(e) => {
            warn!("{e}");
            return Ok(Chunk::Failed(e.errno()));
        }
    };
    if bytes.is_empty() {
        return Ok(Chunk::Moved(0));
    }
    let Some(buf) = hand_in(caller, &bytes)? else {
        return Ok(no_buffer(bytes.len()));
    };
    // At most memory_blob::CHUNK bytes: an i32, and a u32.
    let len = bytes.len() as u32;
    let answer = call_io_callback(caller, io_cb, (buf, len as i32, user))?;
    release(caller, buf)?;
    Ok(if io_succeeded(io_cb, answer) {
        Chunk::Moved(len)
    } else {
        Chunk::Refused
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_written_and_read_back_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = staging_path(dir.path(), 3);
        write_chunk(&path, 0, b"abc").unwrap();
        write_chunk(&path, 3, b"def").unwrap();
        assert_eq!(read_chunk(&path, 0, 4).unwrap(), b"abcd");
        assert_eq!(read_chunk(&path, 4, 4).unwrap(), b"ef");
        assert_eq!(read_chunk(&path, 6, 4).unwrap(), b"");
        // Offset 0 starts the file over.
        write_chunk(&path, 0, b"x").unwrap();
        assert_eq!(read_chunk(&path, 0, 9).unwrap(), b"x");
        let missing = read_chunk(&dir.path().join("nope"), 0, 1).unwrap_err();
        assert_eq!(missing.errno(), libc::ENOENT as u32);
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    #[test]
    fn the_sweep_removes_staging_files_only() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            ".evp-memory-blob-1",
            ".evp-memory-blob-22",
            "keep.bin",
            ".evp-x",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_staging_files(dir.path()).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".evp-x", "keep.bin"]);
        assert_eq!(remove_staging_files(&dir.path().join("absent")).unwrap(), 0);
        // Removing one that is gone is fine; an empty PUT's file is made.
        remove_staging(&staging_path(dir.path(), 1)).unwrap();
        ensure_exists(&staging_path(dir.path(), 5)).unwrap();
        assert_eq!(read_chunk(&staging_path(dir.path(), 5), 0, 1).unwrap(), b"");
    }
}
