//! The spool's files: append-only segments of records. A record is
//! `[u32 body length][u32 CRC-32 of the body][body]`, little endian, and a body is
//! `[u64 seq][u16 instance length][instance][u16 topic length][topic][payload]`. A record cut
//! short by a power cut, or whose bytes the disk lost, fails its length or CRC check; a scan
//! keeps what comes before it and reports where the good part ends, so the caller can cut the
//! file there.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// Length and CRC, before each body.
pub const HEADER: usize = 8;
/// Longest body a record may have: a hub message (at most 128 KiB with its topic) and its
/// instance name, with room to spare. A larger length is corruption, not a record.
pub const MAX_BODY: usize = 256 * 1024;
/// Bytes of a body besides instance, topic and payload.
const BODY_FIXED: usize = 8 + 2 + 2;

/// One spooled hub message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its place in its stream; seqs only grow.
    pub seq: u64,
    /// The instance it came from (`""` for the agent's own).
    pub instance: String,
    /// The MQTT topic it goes out on.
    pub topic: String,
    /// The MQTT payload.
    pub payload: Vec<u8>,
}

impl Record {
    /// Bytes the record takes on disk.
    pub fn disk_len(&self) -> u64 {
        (HEADER + BODY_FIXED + self.instance.len() + self.topic.len() + self.payload.len()) as u64
    }
}

/// Why a record cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The body would exceed [`MAX_BODY`], or a name its u16 length.
    #[error("a spool record of {0} bytes is larger than the {MAX_BODY}-byte limit")]
    TooLarge(usize),
}

/// Appends `record` to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let body = BODY_FIXED + record.instance.len() + record.topic.len() + record.payload.len();
    if body > MAX_BODY || record.instance.len() > usize::from(u16::MAX) {
        return Err(EncodeError::TooLarge(body));
    }
    let start = out.len();
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&record.seq.to_le_bytes());
    for name in [&record.instance, &record.topic] {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
    }
    out.extend_from_slice(&record.payload);
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// What the front of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A record, and the bytes it took.
    Record(Record, usize),
    /// The start of a record whose rest is not there (yet, or ever: a torn write).
    Incomplete,
    /// Not a record: a bad length, CRC or layout.
    Corrupt(&'static str),
}

/// Decodes the record at the front of `buf`.
pub fn decode(buf: &[u8]) -> Decoded {
    let Some(header) = buf.get(..HEADER) else {
        return Decoded::Incomplete;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if !(BODY_FIXED..=MAX_BODY).contains(&len) {
        return Decoded::Corrupt("a record length out of range");
    }
    let Some(body) = buf.get(HEADER..HEADER + len) else {
        return Decoded::Incomplete;
    };
    if crc32fast::hash(body) != crc {
        return Decoded::Corrupt("a record whose CRC does not match");
    }
    let mut at = 8;
    let seq = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
    let mut names = [String::new(), String::new()];
    for name in &mut names {
        let Some(n) = body.get(at..at + 2) else {
            return Decoded::Corrupt("a record cut inside its names");
        };
        let n = usize::from(u16::from_le_bytes([n[0], n[1]]));
        let Some(bytes) = body.get(at + 2..at + 2 + n) else {
            return Decoded::Corrupt("a record cut inside its names");
        };
        let Ok(text) = std::str::from_utf8(bytes) else {
            return Decoded::Corrupt("a record name that is not UTF-8");
        };
        *name = text.to_owned();
        at += 2 + n;
    }
    let [instance, topic] = names;
    let record = Record {
        seq,
        instance,
        topic,
        payload: body[at..].to_vec(),
    };
    Decoded::Record(record, HEADER + len)
}

/// The good records of a segment file and where they end; `damage` says why the rest (if any)
/// was not read.
#[derive(Debug)]
pub struct Scan {
    /// The records, in file order.
    pub records: Vec<Record>,
    /// Length of the good prefix.
    pub good_len: u64,
    /// Why bytes after `good_len` were left, if any were.
    pub damage: Option<&'static str>,
}

/// Reads every record of the segment at `path`.
pub fn scan(path: &Path) -> io::Result<Scan> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut records = Vec::new();
    let mut at = 0;
    let damage = loop {
        if at == bytes.len() {
            break None;
        }
        match decode(&bytes[at..]) {
            Decoded::Record(r, used) => {
                records.push(r);
                at += used;
            }
            Decoded::Incomplete => break Some("a record cut short (a write torn by a crash)"),
            Decoded::Corrupt(why) => break Some(why),
        }
    };
    Ok(Scan {
        records,
        good_len: at as u64,
        damage,
    })
}

/// Reads records one after another from a segment, from an offset, through a buffer.
#[derive(Debug)]
pub struct Reader {
    file: File,
    /// File offset of `buf[0]`.
    offset: u64,
    buf: Vec<u8>,
}

/// How much a reader asks of the file at once.
const READ_CHUNK: usize = 64 * 1024;

impl Reader {
    /// A reader of `path` from its start.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Reader {
            file: File::open(path)?,
            offset: 0,
            buf: Vec::new(),
        })
    }

    /// The next record; `None` at the end of what is written so far (the file may grow).
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        loop {
            match decode(&self.buf) {
                Decoded::Record(r, used) => {
                    self.buf.drain(..used);
                    self.offset += used as u64;
                    return Ok(Some(r));
                }
                Decoded::Corrupt(why) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, why));
                }
                Decoded::Incomplete => {
                    let have = self.buf.len();
                    self.file.seek(SeekFrom::Start(self.offset + have as u64))?;
                    self.buf.resize(have + READ_CHUNK, 0);
                    let n = self.file.read(&mut self.buf[have..])?;
                    self.buf.truncate(have + n);
                    if n == 0 {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, payload: &[u8]) -> Record {
        Record {
            seq,
            instance: "inst".into(),
            topic: "v1/devices/me/telemetry".into(),
            payload: payload.to_vec(),
        }
    }

    fn encoded(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            encode(r, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn records_round_trip_and_report_their_length() {
        let r = rec(7, b"{\"a\":1}");
        let bytes = encoded(std::slice::from_ref(&r));
        assert_eq!(bytes.len() as u64, r.disk_len());
        assert_eq!(decode(&bytes), Decoded::Record(r, bytes.len()));
    }

    #[test]
    fn a_torn_or_damaged_record_is_told_apart() {
        let bytes = encoded(&[rec(1, b"12345")]);
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Decoded::Incomplete, "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(decode(&flipped), Decoded::Corrupt(_)));
        let mut huge = bytes;
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Decoded::Corrupt(_)));
    }

    #[test]
    fn a_scan_keeps_the_good_prefix_of_a_torn_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut bytes = encoded(&[rec(1, b"a"), rec(2, b"b")]);
        let good = bytes.len() as u64;
        bytes.extend_from_slice(&encoded(&[rec(3, b"c")])[..5]);
        std::fs::write(&path, &bytes).unwrap();
        let s = scan(&path).unwrap();
        assert_eq!(s.records, vec![rec(1, b"a"), rec(2, b"b")]);
        assert_eq!(s.good_len, good);
        assert!(s.damage.is_some());
    }

    #[test]
    fn a_reader_follows_a_growing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, encoded(&[rec(1, b"a")])).unwrap();
        let mut reader = Reader::open(&path).unwrap();
        assert_eq!(reader.next_record().unwrap(), Some(rec(1, b"a")));
        assert_eq!(reader.next_record().unwrap(), None);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, &encoded(&[rec(2, &[b'x'; 100_000])])).unwrap();
        assert_eq!(
            reader.next_record().unwrap(),
            Some(rec(2, &[b'x'; 100_000]))
        );
    }
}
