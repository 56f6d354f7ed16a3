//! `EVP_processEvent`: one event from sdk-broker, dispatched to the guest's callback inside the
//! call (host → guest re-entry), with the data it needs copied in with the guest's `malloc`
//! and freed with its `free` once the callback returned. The chunks of memory blob operations
//! (`memory_blob.rs`) are events too: while one waits, the call serves it and sdk-broker's
//! events in turns, and sdk-broker is only polled.

use std::time::{Duration, Instant};

use evp_schemas::sdk::{Event, EvpResult, Request, RpcStatus};
use tracing::warn;
use wasmtime::{Caller, Val};

use super::{HostState, call_table, check_handle, code, hand_in, memory_blob, release};
use crate::guest::nul_terminated;
use crate::session::{Registered, guest_callback, wire_callback};

/// How long one wait of a threaded module's `EVP_processEvent` holds the SDK session.
const THREADED_WAIT_SLICE: Duration = Duration::from_millis(50);

/// What an RPC to a module without an RPC callback is answered (as the Rust SDK answers it).
const NO_RPC_CALLBACK: &str = "{\"error\":\"this module has no RPC callback\"}";

pub(super) fn process_event(
    mut caller: Caller<'_, HostState>,
    h: i32,
    timeout_ms: i32,
) -> wasmtime::Result<i32> {
    check_handle!(h);
    let local_first = caller.data().sdk().memory_blobs.local_turn();
    if local_first && let Some(done) = memory_blob::run_steps(&mut caller)? {
        return Ok(done);
    }
    // With memory blob chunks waiting, sdk-broker is polled, not waited for.
    let local_waiting = caller.data().sdk().memory_blobs.has_work();
    let timeout_ms = if local_waiting { 0 } else { timeout_ms };
    let event = if caller.data().threads.is_some() {
        wait_in_slices(&caller, timeout_ms)
    } else {
        // The session stays locked while waiting: the SDK is one request at a time.
        caller.data().sdk().get_event(timeout_ms)
    };
    match event {
        Ok(Event::None) if local_waiting => {
            Ok(memory_blob::run_steps(&mut caller)?.unwrap_or(code(EvpResult::TimedOut)))
        }
        Ok(event) => dispatch(&mut caller, event),
        // A connection that failed (sdk-broker gone, or the instance is being stopped) is the
        // end of the module's SDK, as for the C client: SHOULDEXIT.
        Err(e) => Ok(code(e.result())),
    }
}

/// Waits for an event in slices of [`THREADED_WAIT_SLICE`], unlocking the session between
/// them, so the other threads of a threaded module get their SDK calls through while the main
/// thread waits (the socket carries one request at a time).
fn wait_in_slices(
    caller: &Caller<'_, HostState>,
    timeout_ms: i32,
) -> Result<Event, evp_sdk::Error> {
    let deadline = u64::try_from(timeout_ms)
        .ok()
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let slice = left.map_or(THREADED_WAIT_SLICE, |l| l.min(THREADED_WAIT_SLICE));
        let event = caller.data().sdk().get_event(slice.as_millis() as i32)?;
        if !matches!(event, Event::None) || left.is_some_and(|l| l <= slice) {
            return Ok(event);
        }
    }
}

/// Runs the callback an event is for.
fn dispatch(caller: &mut Caller<'_, HostState>, event: Event) -> wasmtime::Result<i32> {
    let reason = |cb, reason: u32| (guest_callback(cb), reason);
    let (target, reason) = match event {
        Event::None => return Ok(code(EvpResult::TimedOut)),
        Event::Exit => {
            // The memory operations still local end with EXIT first, one per call, as
            // sdk-broker's pending requests did before it said exit.
            caller.data().sdk().memory_blobs.exit();
            let done = memory_blob::run_steps(caller)?;
            return Ok(done.unwrap_or(code(EvpResult::ShouldExit)));
        }
        Event::Config { topic, blob } => {
            let registered = caller.data().sdk().configuration;
            return deliver(caller, registered, &topic, &blob);
        }
        Event::MessageReceived { topic, blob } => {
            let registered = caller.data().sdk().message;
            return deliver(caller, registered, &topic, &blob);
        }
        Event::RpcRequest { id, method, params } => {
            return rpc_request(caller, id, &method, &params);
        }
        Event::State { cb, reason: r } => reason(&cb, r.code()),
        Event::MessageSent { cb, reason: r } => reason(&cb, r.code()),
        Event::Telemetry { cb, reason: r } => reason(&cb, r.code()),
        Event::RpcResponse { cb, reason: r } => reason(&cb, r.code()),
        Event::Blob { cb, reason, result } => {
            if let Some(id) = crate::memory_blob::operation_of(&cb) {
                return memory_blob::transfer_done(caller, id, reason, result);
            }
            return blob_done(caller, guest_callback(&cb), reason.code(), result);
        }
    };
    if let Some(r) = target {
        call_table(
            caller,
            r.index,
            &[Val::I32(reason as i32), Val::I32(r.user)],
        )?;
    }
    Ok(code(EvpResult::Ok))
}

/// Calls a blob callback `(reason, result, user)` with the result struct handed in:
/// `EVP_BlobResult*`, 12 bytes: +0 result, +4 http_status, +8 error.
pub(super) fn blob_done(
    caller: &mut Caller<'_, HostState>,
    target: Option<Registered>,
    reason: u32,
    result: evp_schemas::sdk::BlobOutcome,
) -> wasmtime::Result<i32> {
    let Some(r) = target else {
        return Ok(code(EvpResult::Ok));
    };
    if reason == evp_schemas::sdk::BlobReason::Exit.code() {
        // No result with EXIT: the callback gets NULL, as the header says.
        call_table(
            caller,
            r.index,
            &[Val::I32(reason as i32), Val::I32(0), Val::I32(r.user)],
        )?;
        return Ok(code(EvpResult::Ok));
    }
    let mut bytes = Vec::with_capacity(12);
    bytes.extend_from_slice(&result.result.to_le_bytes());
    bytes.extend_from_slice(&result.http_status.to_le_bytes());
    bytes.extend_from_slice(&result.error.to_le_bytes());
    let Some(block) = hand_in(caller, &bytes)? else {
        return Ok(code(EvpResult::NoMem));
    };
    let called = call_table(
        caller,
        r.index,
        &[Val::I32(reason as i32), Val::I32(block), Val::I32(r.user)],
    );
    release_all(caller, &[block], called)?;
    Ok(code(EvpResult::Ok))
}

/// Calls a `(topic, data, len, user)` callback (configuration, message received).
fn deliver(
    caller: &mut Caller<'_, HostState>,
    registered: Option<Registered>,
    topic: &str,
    data: &[u8],
) -> wasmtime::Result<i32> {
    let Some(r) = registered.filter(|r| r.index != 0) else {
        return Ok(code(EvpResult::Ok));
    };
    let Ok(len) = i32::try_from(data.len()) else {
        return Ok(code(EvpResult::TooBig));
    };
    // The data gets a NUL after it too: modules often read configurations as strings.
    let mut data_nul = Vec::with_capacity(data.len() + 1);
    data_nul.extend_from_slice(data);
    data_nul.push(0);
    let Some(blocks) = hand_in_all(caller, &[&nul_terminated(topic), &data_nul])? else {
        return Ok(code(EvpResult::NoMem));
    };
    let called = call_table(
        caller,
        r.index,
        &[
            Val::I32(blocks[0]),
            Val::I32(blocks[1]),
            Val::I32(len),
            Val::I32(r.user),
        ],
    );
    release_all(caller, &blocks, called)?;
    Ok(code(EvpResult::Ok))
}

/// Calls the RPC callback with `(i64 id, method, params, user)`, or answers the command with
/// an error when the module registered none.
fn rpc_request(
    caller: &mut Caller<'_, HostState>,
    id: u64,
    method: &str,
    params: &str,
) -> wasmtime::Result<i32> {
    // Read first: the session must not be locked while the answer below is sent.
    let registered = caller.data().sdk().rpc;
    let Some(r) = registered else {
        let answer = Request::SendRpcResponse {
            id,
            response: Some(NO_RPC_CALLBACK.to_owned()),
            status: RpcStatus::Error.code(),
            cb: wire_callback(0, 0),
        };
        let _ = caller.data().sdk().simple(&answer);
        return Ok(code(EvpResult::Ok));
    };
    let Some(blocks) = hand_in_all(caller, &[&nul_terminated(method), &nul_terminated(params)])?
    else {
        return Ok(code(EvpResult::NoMem));
    };
    let called = call_table(
        caller,
        r.index,
        &[
            Val::I64(id as i64),
            Val::I32(blocks[0]),
            Val::I32(blocks[1]),
            Val::I32(r.user),
        ],
    );
    release_all(caller, &blocks, called)?;
    Ok(code(EvpResult::Ok))
}

/// Copies each buffer into a block of its own; `None` (with what was allocated freed again)
/// when the guest's `malloc` ran out.
fn hand_in_all(
    caller: &mut Caller<'_, HostState>,
    buffers: &[&[u8]],
) -> wasmtime::Result<Option<Vec<i32>>> {
    let mut blocks = Vec::with_capacity(buffers.len());
    for buffer in buffers {
        match hand_in(caller, buffer)? {
            Some(ptr) => blocks.push(ptr),
            None => {
                warn!(
                    "the module's malloc returned NULL for {} bytes; an SDK event was dropped",
                    buffer.len()
                );
                release_all(caller, &blocks, Ok(()))?;
                return Ok(None);
            }
        }
    }
    Ok(Some(blocks))
}

/// Frees the blocks after a callback, unless it trapped (the instance is over then).
fn release_all(
    caller: &mut Caller<'_, HostState>,
    blocks: &[i32],
    called: wasmtime::Result<()>,
) -> wasmtime::Result<()> {
    called?;
    for block in blocks {
        release(caller, *block)?;
    }
    Ok(())
}
