//! Breaks the SDK wire format on purpose, one connection per misdeed, then connects as a good
//! module and reports what each misdeed was answered (see the crate's table). The misdeeds are
//! the rows of `docs/sdk-wire.md` §4 plus a flood that never reads its answers, hundreds of
//! connections at once and a record that claims 0xFFFFFFFF bytes.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use evp_schemas::sdk::{Callback, HEADER_LEN, MAX_PAYLOAD, Request, Response};
use evp_sdk_test_modules::{TICK, connect, finish};
use serde_json::{Value, json};

const NAME: &str = "hostile";
/// How long a misdeed waits for the broker's answer (or its closing the connection).
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// Connections opened at once.
const CONNECTIONS: usize = 300;
/// What follows the 0xFFFFFFFF header.
const ENDLESS_BYTES: usize = 64 * 1024 * 1024;

fn socket() -> UnixStream {
    let path = std::env::var(evp_schemas::instance::ENV_SDK_SOCKET)
        .unwrap_or_else(|_| "/evp/sdk.sock".into());
    let s = UnixStream::connect(&path).unwrap_or_else(|e| {
        eprintln!("{NAME}: connecting to {path}: {e}");
        std::process::exit(1);
    });
    let _ = s.set_read_timeout(Some(ANSWER_WAIT));
    s
}

fn header(size: u32, zero: u32, xid: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&zero.to_le_bytes());
    h.extend_from_slice(&xid.to_le_bytes());
    h
}

/// What came back on `s`: `"<RESULT>"` for a Simple answer to `xid`, `"closed"` for EOF (or a
/// reset), `"silent"` when nothing came within the wait, or what else arrived.
fn answer(s: &mut UnixStream, xid: u64) -> String {
    let mut head = [0u8; HEADER_LEN];
    match s.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return "silent".into();
        }
        Err(_) => return "closed".into(),
    }
    let size = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let got_xid = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    if size == 0 || size > MAX_PAYLOAD {
        return format!("bad answer header, size {size}");
    }
    let mut payload = vec![0u8; size];
    if s.read_exact(&mut payload).is_err() {
        return "truncated answer".into();
    }
    match Response::decode(&payload) {
        Ok(Response::Simple(r)) if got_xid == xid => r.to_string(),
        other => format!("unexpected {other:?} for xid {got_xid}"),
    }
}

/// `answer`, then whether the broker closed the connection after it.
fn answer_then(s: &mut UnixStream, xid: u64) -> String {
    let first = answer(s, xid);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut byte = [0u8; 1];
    let after = match s.read(&mut byte) {
        Ok(0) => "closed",
        Ok(_) => "more",
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => "open",
        Err(_) => "closed",
    };
    format!("{first}, {after}")
}

fn state(xid: u64) -> Vec<u8> {
    let payload = Request::SendState {
        topic: "hostile/alive".into(),
        blob: b"1".to_vec(),
        cb: Callback::default(),
    }
    .encode();
    [header(payload.len() as u32, 0, xid), payload].concat()
}

/// A payload over the limit: drained and answered `EVP_TOOBIG`; the same connection then
/// serves a good request.
fn oversized() -> Value {
    let mut s = socket();
    let big = MAX_PAYLOAD + 70_000;
    let _ = s.write_all(&header(big as u32, 0, 1));
    let _ = s.write_all(&vec![0xAB; big]);
    let first = answer(&mut s, 1);
    let _ = s.write_all(&state(2));
    json!([first, answer(&mut s, 2)])
}

/// A header whose second word is not 0, then one whose size is 0: each `EVP_INVAL`, closed.
fn bad_headers() -> Value {
    let mut s = socket();
    let _ = s.write_all(&header(8, 1, 3));
    let zero = answer_then(&mut s, 3);
    let mut s = socket();
    let _ = s.write_all(&header(0, 0, 4));
    json!([zero, answer_then(&mut s, 4)])
}

/// Bytes that are no flatbuffer, under a good header: closed without an answer.
fn garbage() -> Value {
    let mut s = socket();
    let junk: Vec<u8> = (0..256u32).map(|i| (i * 37 % 251) as u8 | 0x80).collect();
    let _ = s.write_all(&header(junk.len() as u32, 0, 5));
    let _ = s.write_all(&junk);
    json!(answer(&mut s, 5))
}

/// A record cut short (10 of 100 payload bytes, then the write side shut): the connection
/// ends, and the next one is served.
fn truncated() -> Value {
    let mut s = socket();
    let _ = s.write_all(&header(100, 0, 6));
    let _ = s.write_all(&[0u8; 10]);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let cut = answer(&mut s, 6);
    let mut next = socket();
    let _ = next.write_all(&state(7));
    json!([cut, answer(&mut next, 7)])
}

/// Requests written as fast as the socket takes them, never reading an answer, until writes
/// have blocked for 2 s: the broker stops reading once its answers back up. Returns how many
/// went out (bounded by the socket buffers, not by the broker's memory).
fn flood() -> Value {
    let mut s = socket();
    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
    // An event poll with a deadline already past: each is answered at once.
    let poll = Request::GetEvent {
        deadline_sec: 0,
        deadline_nsec: 0,
    }
    .encode();
    let one = [header(poll.len() as u32, 0, 8), poll].concat();
    let (mut sent, mut blocked) = (0u64, Duration::ZERO);
    while blocked < Duration::from_secs(2) && sent < 10_000_000 {
        let t = Instant::now();
        match s.write_all(&one) {
            Ok(()) => sent += 1,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                blocked += t.elapsed();
            }
            Err(_) => break,
        }
    }
    eprintln!("{NAME}: flood: {sent} requests written before the socket stayed full");
    json!(sent < 10_000_000)
}

/// Hundreds of connections at once, held 1 s, then dropped: counts how many the broker closed
/// at once (it holds a few waiting for the slot and refuses the rest).
fn connections() -> Value {
    let held: Vec<UnixStream> = (0..CONNECTIONS).map(|_| socket()).collect();
    std::thread::sleep(Duration::from_secs(1));
    let closed = held
        .iter()
        .filter(|s| {
            let _ = s.set_nonblocking(true);
            let mut b = [0u8; 1];
            matches!((&**s).read(&mut b), Ok(0))
        })
        .count();
    drop(held);
    json!(closed)
}

/// A connection that is served: the broker refuses new ones at once while the closed ones of
/// [`connections`] still hold their places, so this asks until a good request is answered.
fn served() -> UnixStream {
    let end = Instant::now() + ANSWER_WAIT;
    loop {
        let mut s = socket();
        if s.write_all(&state(10)).is_ok() && answer(&mut s, 10) == "EVP_OK" {
            return s;
        }
        if Instant::now() > end {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A header claiming 0xFFFFFFFF bytes, then 64 MiB of them and the connection closed: the
/// broker drains without holding them.
fn endless() -> Value {
    let mut s = served();
    let _ = s.write_all(&header(u32::MAX, 0, 9));
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0usize;
    while written < ENDLESS_BYTES {
        if s.write_all(&chunk).is_err() {
            break;
        }
        written += chunk.len();
    }
    json!(written)
}

fn main() {
    let report = json!({
        "oversized": oversized(),
        "badHeaders": bad_headers(),
        "garbage": garbage(),
        "truncated": truncated(),
        "floodBounded": flood(),
        "closedAtOnce": connections(),
        "endlessWritten": endless(),
    });
    eprintln!("{NAME}: {report}");
    // Then a good module: the report as a state, configurations echoed as states.
    let mut client = connect(NAME);
    let registered = client.set_configuration_callback(|c, topic, value| {
        if let Err(e) = c.send_state(topic, value, |_| {}) {
            eprintln!("{NAME}: state {topic} refused: {e}");
        }
    });
    if let Err(e) = registered {
        eprintln!("{NAME}: {e}");
        std::process::exit(1);
    }
    if let Err(e) = client.send_state("report", report.to_string().as_bytes(), |_| {}) {
        eprintln!("{NAME}: report refused: {e}");
    }
    finish(NAME, client.run_until_exit(TICK, |_| {}));
}
