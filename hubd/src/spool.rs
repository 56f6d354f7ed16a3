//! hubd's spool: what the device sends the hub that must not be lost while the hub is away,
//! kept on disk under `<data_dir>/hub/spool/` until the broker acknowledged it (QoS 1).
//!
//! Two streams, drained in this order: direct-command answers (`responses/`), then telemetry
//! (`telemetry/`), each in the order it was accepted, so telemetry stays in order per instance.
//! The status report and the instance-state report are not spooled: only their latest matters,
//! and the session sends it whole at every (re)connect, before the spool drains.
//!
//! Every record is written (one `write` per batch) before it is published, online too, so a
//! hubd crash or kill loses nothing accepted; the page cache keeps it. The fsync policy bounds
//! what a power cut can take: a tail with records still waiting for the hub is synced at most
//! [`Limits::sync_every`] after they were written (records acknowledged by then need none), so
//! a steady online flow costs writes to the page cache and almost no fsync. The cursor (each
//! stream's acknowledged watermark, and the drop counts) is rewritten atomically at most every
//! [`CURSOR_EVERY`]; a stale one only means duplicates after a crash (at-least-once).
//!
//! Bounds: [`Limits::max_bytes`] in all, [`Limits::instance_max_bytes`] per instance. An
//! instance over its quota loses its newest telemetry; a full spool loses its oldest telemetry,
//! a whole segment (1/16 of the spool) at a time. Every loss is counted per instance
//! ([`Spool::dropped`]); the status report carries the counts as
//! `state/$agent/telemetry-dropped`.

mod segment;
mod stream;
pub mod task;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::warn;

pub use segment::{EncodeError, Record};
use stream::Stream;

/// The process named in crash-hook lines.
pub(crate) const DAEMON: &str = "evp-hubd";
/// The spool's write points for `EVP_TEST_CRASH_AT` (debug builds): a batch appended and not
/// synced, a tail synced, a segment file removed, the cursor renamed into place.
pub const CRASH_POINTS: [&str; 4] = [
    "spool-appended",
    "spool-synced",
    "spool-segment-removed",
    "spool-cursor-written",
];

/// Default bound of the whole spool: a day of a module sending a 100-byte value every 5 s is
/// 1.7 MB, so 16 MiB carries a few chatty modules through a day offline, and is little on a
/// gateway's flash.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;
/// Default bound of one instance: half the spool, so one noisy module leaves room for others.
pub const DEFAULT_INSTANCE_MAX_BYTES: u64 = 8 << 20;
/// Default longest time a record waiting for the hub stays unsynced: the loss window of a power
/// cut, and at most one fsync a second under any load.
pub const DEFAULT_SYNC_EVERY: Duration = Duration::from_secs(1);
/// The cursor is rewritten at most this often (each rewrite is a file, an fsync and a rename).
pub const CURSOR_EVERY: Duration = Duration::from_secs(5);
/// The longest segment: small enough that dropping one loses little, large enough that a
/// full spool is a handful of files.
const MAX_SEGMENT_BYTES: u64 = 1 << 20;
const CURSOR_FILE: &str = "cursor.json";

/// The spool's bounds and sync policy (`[hub] spool_*` in agent.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes on disk, all streams together.
    pub max_bytes: u64,
    /// Bytes of one instance's telemetry.
    pub instance_max_bytes: u64,
    /// Longest time a waiting record stays unsynced.
    pub sync_every: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: DEFAULT_MAX_BYTES,
            instance_max_bytes: DEFAULT_INSTANCE_MAX_BYTES,
            sync_every: DEFAULT_SYNC_EVERY,
        }
    }
}

impl Limits {
    /// Segment size: 1/16 of the spool, between 4 KiB and 1 MiB.
    fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 16).clamp(4096, MAX_SEGMENT_BYTES)
    }
}

/// Why the spool failed; each names the file and the action.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The directory cannot be made or used.
    #[error("spool directory {}: {error}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// A file operation failed (a full disk is `ENOSPC` here).
    #[error("{action} {}: {error}", path.display())]
    Io {
        /// What hubd was doing.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// A message too large for a record (never one hubd would publish).
    #[error(transparent)]
    Encode(EncodeError),
    /// The cursor could not be written.
    #[error("writing the spool cursor: {0}")]
    Cursor(String),
}

/// Makes `dir` (0700) if absent.
pub(crate) fn private_dir(dir: &Path) -> Result<(), SpoolError> {
    evp_daemon::create_private_dir(dir, 0o700).map_err(|e| SpoolError::Dir {
        path: dir.to_owned(),
        error: io::Error::other(e.to_string()),
    })
}

/// Bytes a record of `payload_len` payload bytes takes on disk.
fn record_len(instance: &str, topic: &str, payload_len: usize) -> u64 {
    Record {
        seq: 0,
        instance: instance.to_owned(),
        topic: topic.to_owned(),
        payload: Vec::new(),
    }
    .disk_len()
        + payload_len as u64
}

impl SpoolError {
    fn io(action: &'static str, path: &Path, error: io::Error) -> Self {
        SpoolError::Io {
            action,
            path: path.to_owned(),
            error,
        }
    }
}

/// The streams, in drain order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Direct-command answers.
    Response,
    /// Telemetry.
    Telemetry,
}

/// The high bit of a tag says which stream its seq belongs to.
const TELEMETRY_TAG: u64 = 1 << 63;

/// The tag that goes with a record through MQTT and comes back with its PUBACK.
pub fn tag(class: Class, seq: u64) -> u64 {
    match class {
        Class::Response => seq & !TELEMETRY_TAG,
        Class::Telemetry => seq | TELEMETRY_TAG,
    }
}

fn untag(tag: u64) -> (Class, u64) {
    if tag & TELEMETRY_TAG != 0 {
        (Class::Telemetry, tag & !TELEMETRY_TAG)
    } else {
        (Class::Response, tag)
    }
}

/// What the cursor file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    responses: u64,
    telemetry: u64,
    /// Telemetry messages dropped, per instance, since the device was installed.
    dropped: BTreeMap<String, u64>,
}

/// The spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    limits: Limits,
    responses: Stream,
    telemetry: Stream,
    dropped: BTreeMap<String, u64>,
    /// The cursor as last written.
    written: Cursor,
}

impl Spool {
    /// Opens the spool in `dir` (made if absent), with what an earlier run left there.
    pub fn open(dir: &Path, limits: Limits) -> Result<Self, SpoolError> {
        private_dir(dir)?;
        let path = dir.join(CURSOR_FILE);
        let cursor = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                // Sending again beats losing: a lost cursor only means duplicates.
                warn!(
                    "{}: {e}; the spool is sent again from its start",
                    path.display()
                );
                Cursor::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Cursor::default(),
            Err(e) => return Err(SpoolError::io("reading", &path, e)),
        };
        Ok(Spool {
            dir: dir.to_owned(),
            limits,
            responses: Stream::open(&dir.join("responses"), cursor.responses)?,
            telemetry: Stream::open(&dir.join("telemetry"), cursor.telemetry)?,
            dropped: cursor.dropped.clone(),
            written: cursor,
        })
    }

    /// Accepts telemetry messages `(instance, payload)`, in order. An instance over its quota
    /// loses the new message; a full spool loses its oldest telemetry to make room. Returns how
    /// many of these messages were dropped (all losses are in [`Spool::dropped`]).
    pub fn push_telemetry(
        &mut self,
        topic: &str,
        messages: Vec<(String, Vec<u8>)>,
    ) -> Result<u64, SpoolError> {
        let mut accepted = Vec::with_capacity(messages.len());
        let mut batch: BTreeMap<String, u64> = BTreeMap::new();
        let mut batch_bytes = 0;
        let mut refused = 0;
        for (instance, payload) in messages {
            let size = record_len(&instance, topic, payload.len());
            let mine = self.telemetry.instance_bytes(&instance)
                + batch.get(&instance).copied().unwrap_or(0);
            // A quota as large as the spool is no quota: the oldest go first, whoever's.
            if self.limits.instance_max_bytes < self.limits.max_bytes
                && mine + size > self.limits.instance_max_bytes
            {
                *self.dropped.entry(instance).or_default() += 1;
                refused += 1;
                continue;
            }
            if !self.make_room(batch_bytes + size)? {
                *self.dropped.entry(instance).or_default() += 1;
                refused += 1;
                continue;
            }
            *batch.entry(instance.clone()).or_default() += size;
            batch_bytes += size;
            accepted.push((instance, topic.to_owned(), payload));
        }
        let lost_if_unwritten: Vec<String> = accepted.iter().map(|(i, _, _)| i.clone()).collect();
        if let Err(e) = self.telemetry.append(accepted, self.limits.segment_bytes()) {
            for instance in lost_if_unwritten {
                *self.dropped.entry(instance).or_default() += 1;
            }
            return Err(e);
        }
        Ok(refused)
    }

    /// Drops the oldest telemetry until `extra` more bytes fit; whether they do.
    fn make_room(&mut self, extra: u64) -> Result<bool, SpoolError> {
        while self.queued_bytes() + extra > self.limits.max_bytes {
            let Some(lost) = self.telemetry.drop_oldest()? else {
                return Ok(false);
            };
            for (who, c) in lost {
                *self.dropped.entry(who).or_default() += c.records;
            }
        }
        Ok(true)
    }

    /// Accepts a direct-command answer. Answers take room from telemetry (its oldest goes)
    /// but never from each other: one that finds the spool full of answers is refused.
    pub fn push_response(
        &mut self,
        instance: &str,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<bool, SpoolError> {
        let size = record_len(instance, topic, payload.len());
        if !self.make_room(size)? {
            return Ok(false);
        }
        self.responses.append(
            vec![(instance.to_owned(), topic.to_owned(), payload)],
            self.limits.segment_bytes(),
        )?;
        Ok(true)
    }

    /// The next record to publish, answers first, with its tag. The caller publishes it and
    /// then calls [`Spool::sent`]; until then, it must not ask for another.
    pub fn next_unsent(&mut self) -> Result<Option<(u64, Record)>, SpoolError> {
        if let Some(r) = self.responses.next_unsent()? {
            return Ok(Some((tag(Class::Response, r.seq), r)));
        }
        Ok(self
            .telemetry
            .next_unsent()?
            .map(|r| (tag(Class::Telemetry, r.seq), r)))
    }

    /// `record` (tagged `tag`) was handed to MQTT.
    pub fn sent(&mut self, tag: u64, record: &Record) {
        match untag(tag).0 {
            Class::Response => self.responses.sent(record),
            Class::Telemetry => self.telemetry.sent(record),
        }
    }

    /// The broker acknowledged the record tagged `tag`.
    pub fn acked(&mut self, tag: u64) -> Result<(), SpoolError> {
        let segment = self.limits.segment_bytes();
        match untag(tag) {
            (Class::Response, seq) => self.responses.acked(seq, segment),
            (Class::Telemetry, seq) => self.telemetry.acked(seq, segment),
        }
    }

    /// The connection went: everything not acknowledged goes out again on the next one.
    pub fn rewind(&mut self) {
        self.responses.rewind();
        self.telemetry.rewind();
    }

    /// Whether records wait to be published.
    pub fn has_unsent(&self) -> bool {
        self.responses.has_unsent() || self.telemetry.has_unsent()
    }

    /// Records published and not yet acknowledged.
    pub fn inflight(&self) -> usize {
        self.responses.inflight() + self.telemetry.inflight()
    }

    /// Bytes accepted and not yet acknowledged (`Hub1.QueuedBytes`).
    pub fn queued_bytes(&self) -> u64 {
        self.responses.unacked_bytes() + self.telemetry.unacked_bytes()
    }

    /// Telemetry messages dropped, per instance, since the device was installed.
    pub fn dropped(&self) -> &BTreeMap<String, u64> {
        &self.dropped
    }

    /// Whether [`Spool::sync`] has something to do.
    pub fn needs_sync(&self) -> bool {
        self.responses.needs_sync() || self.telemetry.needs_sync()
    }

    /// Whether the cursor on disk is behind.
    pub fn cursor_behind(&self) -> bool {
        self.cursor() != self.written
    }

    /// Syncs what waits for the hub.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.responses.sync()?;
        self.telemetry.sync()
    }

    /// Rewrites the cursor if it is behind.
    pub fn write_cursor(&mut self) -> Result<(), SpoolError> {
        let cursor = self.cursor();
        if cursor == self.written {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&cursor).map_err(|e| SpoolError::Cursor(e.to_string()))?;
        evp_daemon::write_atomic(&self.dir.join(CURSOR_FILE), &bytes, 0o600, None)
            .map_err(|e| SpoolError::Cursor(e.to_string()))?;
        evp_daemon::crash::point(DAEMON, "spool-cursor-written");
        self.written = cursor;
        Ok(())
    }

    fn cursor(&self) -> Cursor {
        Cursor {
            responses: self.responses.watermark(),
            telemetry: self.telemetry.watermark(),
            dropped: self.dropped.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
