//! One stream of the spool: its segment files in a directory of their own, the watermark below
//! which everything reached the hub, and the records handed to MQTT and not yet acknowledged.
//! Records go out in seq order and the broker acknowledges QoS 1 in order (MQTT 3.1.1 §4.6),
//! so one number, the watermark, says what is done.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tracing::warn;

use super::segment::{self, Reader, Record};
use super::{DAEMON, SpoolError};

/// Segment file names: the first seq, 16 hex digits, so that names sort as seqs do.
const SEGMENT_SUFFIX: &str = ".seg";

/// Records and bytes of one instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// Records.
    pub records: u64,
    /// Bytes on disk.
    pub bytes: u64,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    /// The last seq written; `first_seq - 1` while empty.
    last_seq: u64,
    path: PathBuf,
    disk_bytes: u64,
    /// What of it has not reached the hub, per instance.
    unacked: BTreeMap<String, Count>,
}

/// One stream.
#[derive(Debug)]
pub struct Stream {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    /// The last segment, open for appending.
    tail: Option<File>,
    next_seq: u64,
    /// Every seq up to this one reached the hub (or was dropped).
    acked: u64,
    /// The highest seq handed to MQTT on this connection.
    sent_upto: u64,
    /// The segment being read (its first seq) and the reader.
    reader: Option<(u64, Reader)>,
    /// Handed to MQTT, not acknowledged yet: seq → instance and bytes.
    inflight: BTreeMap<u64, (String, u64)>,
    /// The tail holds written records that are not synced yet.
    unsynced: bool,
    /// Files were created or removed since the directory was last synced.
    dir_changed: bool,
}

impl Stream {
    /// Opens the stream in `dir` (made if absent), whose watermark was `acked`: reads every
    /// segment, cuts a torn tail, removes segments that are wholly done.
    pub fn open(dir: &Path, acked: u64) -> Result<Self, SpoolError> {
        super::private_dir(dir)?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| SpoolError::io("reading", dir, e))? {
            let entry = entry.map_err(|e| SpoolError::io("reading", dir, e))?;
            let name = entry.file_name();
            let Some(first) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            names.push((first, entry.path()));
        }
        names.sort();
        let mut stream = Stream {
            dir: dir.to_owned(),
            segments: VecDeque::new(),
            tail: None,
            next_seq: acked + 1,
            acked,
            sent_upto: acked,
            reader: None,
            inflight: BTreeMap::new(),
            unsynced: false,
            dir_changed: false,
        };
        let count = names.len();
        for (i, (first_seq, path)) in names.into_iter().enumerate() {
            let scan = segment::scan(&path).map_err(|e| SpoolError::io("reading", &path, e))?;
            if let Some(why) = scan.damage {
                // Only the last segment can be torn by a crash; a damaged earlier one lost
                // bytes on disk. Either way its good part is kept and the rest cut.
                warn!(
                    "spool segment {} ({} of {count}): {why} after byte {}; the rest is cut off",
                    path.display(),
                    i + 1,
                    scan.good_len
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| SpoolError::io("opening", &path, e))?;
                f.set_len(scan.good_len)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| SpoolError::io("cutting", &path, e))?;
            }
            let mut seg = Segment {
                first_seq,
                last_seq: first_seq.saturating_sub(1),
                path,
                disk_bytes: scan.good_len,
                unacked: BTreeMap::new(),
            };
            for r in &scan.records {
                seg.last_seq = seg.last_seq.max(r.seq);
                if r.seq > acked {
                    let c = seg.unacked.entry(r.instance.clone()).or_default();
                    c.records += 1;
                    c.bytes += r.disk_len();
                }
            }
            stream.next_seq = stream.next_seq.max(seg.last_seq + 1);
            if seg.unacked.is_empty() {
                stream.remove_file(&seg.path)?;
            } else {
                stream.segments.push_back(seg);
            }
        }
        Ok(stream)
    }

    /// Appends `records` (instance, topic, payload) in one write; gives each its seq. A tail
    /// that reached `segment_bytes` is closed first and a new segment started.
    pub fn append(
        &mut self,
        records: Vec<(String, String, Vec<u8>)>,
        segment_bytes: u64,
    ) -> Result<(), SpoolError> {
        let mut buf = Vec::new();
        let mut added: Vec<(String, u64)> = Vec::with_capacity(records.len());
        let first = self.next_seq;
        for (instance, topic, payload) in records {
            let record = Record {
                seq: self.next_seq,
                instance,
                topic,
                payload,
            };
            segment::encode(&record, &mut buf).map_err(SpoolError::Encode)?;
            let len = record.disk_len();
            added.push((record.instance, len));
            self.next_seq += 1;
        }
        if added.is_empty() {
            return Ok(());
        }
        if self
            .segments
            .back()
            .is_none_or(|s| s.disk_bytes >= segment_bytes)
            || self.tail.is_none()
        {
            self.start_segment(first)?;
        }
        let (Some(tail), Some(seg)) = (self.tail.as_mut(), self.segments.back_mut()) else {
            return Err(SpoolError::io(
                "appending to",
                &self.dir,
                io::Error::other("no tail segment"),
            ));
        };
        tail.write_all(&buf)
            .map_err(|e| SpoolError::io("appending to", &seg.path, e))?;
        evp_daemon::crash::point(DAEMON, "spool-appended");
        seg.disk_bytes += buf.len() as u64;
        seg.last_seq = self.next_seq - 1;
        for (instance, bytes) in added {
            let c = seg.unacked.entry(instance).or_default();
            c.records += 1;
            c.bytes += bytes;
        }
        self.unsynced = true;
        Ok(())
    }

    fn start_segment(&mut self, first_seq: u64) -> Result<(), SpoolError> {
        self.sync()?;
        let path = self.dir.join(format!("{first_seq:016x}{SEGMENT_SUFFIX}"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| SpoolError::io("creating", &path, e))?;
        // A tail still empty (every record of it done) gives way to the new one.
        if let Some(old) = self.segments.back()
            && old.unacked.is_empty()
        {
            let old = self.segments.pop_back().map(|s| s.path);
            if let Some(p) = old {
                self.remove_file(&p)?;
            }
        }
        self.segments.push_back(Segment {
            first_seq,
            last_seq: first_seq - 1,
            path,
            disk_bytes: 0,
            unacked: BTreeMap::new(),
        });
        self.tail = Some(file);
        self.dir_changed = true;
        Ok(())
    }

    fn remove_file(&mut self, path: &Path) -> Result<(), SpoolError> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SpoolError::io("removing", path, e)),
        }
        self.dir_changed = true;
        evp_daemon::crash::point(DAEMON, "spool-segment-removed");
        Ok(())
    }

    /// The next record to hand to MQTT, if any is waiting.
    pub fn next_unsent(&mut self) -> Result<Option<Record>, SpoolError> {
        loop {
            let want = self.sent_upto.max(self.acked) + 1;
            if want >= self.next_seq {
                return Ok(None);
            }
            let Some(seg) = self.segments.iter().find(|s| s.last_seq >= want) else {
                return Ok(None);
            };
            let (first, last, path) = (seg.first_seq, seg.last_seq, seg.path.clone());
            if self.reader.as_ref().is_none_or(|(f, _)| *f != first) {
                let reader =
                    Reader::open(&path).map_err(|e| SpoolError::io("reading", &path, e))?;
                self.reader = Some((first, reader));
            }
            let Some((_, reader)) = self.reader.as_mut() else {
                return Ok(None);
            };
            match reader.next_record() {
                Ok(Some(r)) if r.seq < want => continue,
                Ok(Some(r)) => return Ok(Some(r)),
                // The segment ends before the seqs it was written with (its tail was cut at
                // start, a torn write) or cannot be read on: what it lacks is skipped.
                Ok(None) => warn!(
                    "spool segment {} ends before seq {last}: skipping the missing records",
                    path.display()
                ),
                Err(e) => warn!(
                    "spool segment {}: {e}; skipping what is left of it",
                    path.display()
                ),
            }
            self.sent_upto = self.sent_upto.max(last);
            self.reader = None;
        }
    }

    /// Records that `record` was handed to MQTT.
    pub fn sent(&mut self, record: &Record) {
        self.sent_upto = self.sent_upto.max(record.seq);
        self.inflight
            .insert(record.seq, (record.instance.clone(), record.disk_len()));
    }

    /// The hub acknowledged `seq`. Segments wholly done are removed.
    pub fn acked(&mut self, seq: u64, segment_bytes: u64) -> Result<(), SpoolError> {
        let Some((instance, bytes)) = self.inflight.remove(&seq) else {
            return Ok(());
        };
        if let Some(seg) = self
            .segments
            .iter_mut()
            .find(|s| (s.first_seq..=s.last_seq).contains(&seq))
            && let Some(c) = seg.unacked.get_mut(&instance)
        {
            c.records = c.records.saturating_sub(1);
            c.bytes = c.bytes.saturating_sub(bytes);
            if c.records == 0 {
                seg.unacked.remove(&instance);
            }
        }
        self.acked = match self.inflight.first_key_value() {
            Some((first, _)) => first - 1,
            None => self.sent_upto,
        }
        .max(self.acked);
        // Done segments go, the tail too once it is full (else it takes the next records).
        while let Some(front) = self.segments.front() {
            let is_tail = self.segments.len() == 1;
            let done = front.last_seq <= self.acked && front.unacked.is_empty();
            if !done || (is_tail && front.disk_bytes < segment_bytes) {
                break;
            }
            if is_tail {
                self.tail = None;
            }
            if let Some(seg) = self.segments.pop_front() {
                self.remove_file(&seg.path)?;
            }
        }
        Ok(())
    }

    /// The connection is gone: what was in flight goes out again from the watermark.
    pub fn rewind(&mut self) {
        self.inflight.clear();
        self.sent_upto = self.acked;
        self.reader = None;
    }

    /// Removes the oldest segment, however much of it is still waiting; what of it had not
    /// reached the hub, per instance. `None` when the stream holds nothing.
    pub fn drop_oldest(&mut self) -> Result<Option<BTreeMap<String, Count>>, SpoolError> {
        let Some(seg) = self.segments.pop_front() else {
            return Ok(None);
        };
        if self.segments.is_empty() {
            self.tail = None;
            self.unsynced = false;
        }
        self.acked = self.acked.max(seg.last_seq);
        self.sent_upto = self.sent_upto.max(seg.last_seq);
        self.inflight.retain(|seq, _| *seq > seg.last_seq);
        self.remove_file(&seg.path)?;
        if self
            .reader
            .as_ref()
            .is_some_and(|(f, _)| *f == seg.first_seq)
        {
            self.reader = None;
        }
        Ok(Some(seg.unacked))
    }

    /// Bytes not yet acknowledged.
    pub fn unacked_bytes(&self) -> u64 {
        self.segments
            .iter()
            .flat_map(|s| s.unacked.values())
            .map(|c| c.bytes)
            .sum()
    }

    /// Bytes of `instance` not yet acknowledged.
    pub fn instance_bytes(&self, instance: &str) -> u64 {
        self.segments
            .iter()
            .filter_map(|s| s.unacked.get(instance))
            .map(|c| c.bytes)
            .sum()
    }

    /// Whether records wait to be handed to MQTT.
    pub fn has_unsent(&self) -> bool {
        self.sent_upto.max(self.acked) + 1 < self.next_seq
    }

    /// Records handed to MQTT and not acknowledged.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// The watermark, for the cursor file.
    pub fn watermark(&self) -> u64 {
        self.acked
    }

    /// Whether written records wait for an fsync: only records still waiting for the hub
    /// need one (what reached it is safe whatever the disk loses).
    pub fn needs_sync(&self) -> bool {
        (self.unsynced
            && self
                .segments
                .back()
                .is_some_and(|s| s.last_seq > self.acked))
            || self.dir_changed
    }

    /// Syncs the tail's data when records of it wait for the hub and, after files came or
    /// went, the directory.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        let waiting = self
            .segments
            .back()
            .is_some_and(|s| s.last_seq > self.acked);
        if self.unsynced
            && waiting
            && let (Some(tail), Some(seg)) = (self.tail.as_ref(), self.segments.back())
        {
            tail.sync_data()
                .map_err(|e| SpoolError::io("syncing", &seg.path, e))?;
            evp_daemon::crash::point(DAEMON, "spool-synced");
        }
        self.unsynced = false;
        if self.dir_changed {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| SpoolError::io("syncing", &self.dir, e))?;
            self.dir_changed = false;
        }
        Ok(())
    }
}
