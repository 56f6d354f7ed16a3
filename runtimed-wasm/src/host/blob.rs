//! The blob and stream functions of the SDK. A blob operation on a file goes to sdk-broker
//! over the instance's socket, as a remote module's does (the workspace is pre-opened at its
//! host path, so the file name the module gives is the one sdk-broker checks); its callback
//! comes back as an event (`events.rs`). A memory operation (no file name: the io callback
//! and `blob_len`) is staged through a hidden file of the workspace, `.evp-memory-blob-<n>`,
//! which sdk-broker transfers like any other (`memory_blob.rs`, decided by
//! [`crate::memory_blob`]): a PUT answers `EVP_OK` once checked, its io callback fills the
//! file in chunks inside the next `EVP_processEvent` calls, and then sdk-broker PUTs it; a
//! GET is asked of sdk-broker at once (its refusal is the answer) and, once it succeeded, the
//! file goes to the io callback in chunks inside `EVP_processEvent` (a NULL io callback
//! discards it). The file is removed and the blob callback gets the result as for a file
//! operation; an io callback that answers `EVP_BLOB_IO_RESULT_ERROR` ends the operation with
//! `EVP_BLOB_RESULT_ERROR` and `ECANCELED`, and an exit with EXIT. So the io callbacks come
//! before the transfer (PUT) or after it (GET), not during it, and the disk holds the blob
//! meanwhile. The `EVP_BlobRequestHttpExt_*` helpers manage a struct in guest memory. Streams
//! are asked of sdk-broker, which declares none.

use evp_schemas::sdk::{
    BLOB_TYPE_AZURE_BLOB, BLOB_TYPE_EVP, BLOB_TYPE_EVP_EXT, BLOB_TYPE_HTTP_EXT, BlobRequest,
    EvpResult, Request, Response,
};
use wasmtime::{Caller, Linker};

use super::{
    HostState, args, check_handle, code, hand_in, memory_blob, read, release, with_memory,
};
use crate::abi::{self, IMPORT_MODULE, MAX_BLOB_TYPE};
use crate::guest::{self, HttpExtRequest};
use crate::memory_blob::{Asked, Direction};
use crate::session::{guest_callback, wire_callback};

pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let m = IMPORT_MODULE;
    linker.func_wrap(m, "EVP_blobOperation", blob_operation)?;
    linker.func_wrap(m, "EVP_BlobRequestHttpExt_initialize", http_ext_initialize)?;
    linker.func_wrap(m, "EVP_BlobRequestHttpExt_addHeader", http_ext_add_header)?;
    linker.func_wrap(
        m,
        "EVP_BlobRequestHttpExt_addAzureHeader",
        http_ext_add_azure_header,
    )?;
    linker.func_wrap(m, "EVP_BlobRequestHttpExt_setUrl", http_ext_set_url)?;
    linker.func_wrap(m, "EVP_BlobRequestHttpExt_free", http_ext_free)?;
    linker.func_wrap(
        m,
        "EVP_streamInputOpen",
        |caller: Caller<'_, HostState>, h, name, _cb: i32, _user: i32, _stream: i32| {
            stream_open_call(caller, h, name)
        },
    )?;
    linker.func_wrap(
        m,
        "EVP_streamOutputOpen",
        |caller: Caller<'_, HostState>, h, name, _stream: i32| stream_open_call(caller, h, name),
    )?;
    linker.func_wrap(m, "EVP_streamClose", stream_close)?;
    linker.func_wrap(m, "EVP_streamWrite", stream_write)?;
    Ok(())
}

/// Where an operation's blob comes from or goes to (`EVP_BlobLocalStore`).
enum LocalStore {
    /// A workspace file, by the name the module gave.
    File(String),
    /// The io callback's chunks (no file name).
    Memory {
        /// The io callback's table index.
        io_cb: u32,
        /// The bytes to PUT.
        blob_len: u32,
    },
}

/// `EVP_blobOperation(h, type, op, request, localStore, cb, user)`.
#[allow(clippy::too_many_arguments)]
fn blob_operation(
    mut caller: Caller<'_, HostState>,
    h: i32,
    kind: i32,
    op: i32,
    request: i32,
    local_store: i32,
    cb: i32,
    user: i32,
) -> wasmtime::Result<i32> {
    check_handle!(h);
    if !(0..=MAX_BLOB_TYPE).contains(&kind) {
        return Ok(code(EvpResult::Inval));
    }
    let kind = kind.unsigned_abs();
    let (store, request) = args!(&mut caller, |m| {
        // EVP_BlobLocalStore: +0 filename (0: a memory operation), +4 io_cb, +8 blob_len.
        let at = local_store as u32;
        let filename_ptr = guest::u32_at(m, at)?;
        let store = if filename_ptr == 0 {
            let io_cb = guest::u32_at(m, at.wrapping_add(4))?;
            let blob_len = guest::u32_at(m, at.wrapping_add(8))?;
            LocalStore::Memory { io_cb, blob_len }
        } else {
            LocalStore::File(guest::c_string(m, filename_ptr)?)
        };
        let at = request as u32;
        let request = match kind {
            BLOB_TYPE_HTTP_EXT => {
                let r = HttpExtRequest::read(m, at)?;
                let headers = r
                    .header_pointers(m)?
                    .into_iter()
                    .map(|p| guest::c_string(m, p))
                    .collect::<Result<Vec<_>, _>>()?;
                BlobRequest::HttpExt {
                    url: guest::c_string(m, r.url)?,
                    headers,
                }
            }
            BLOB_TYPE_EVP_EXT => BlobRequest::Evp {
                remote_name: guest::c_string(m, guest::u32_at(m, at)?)?,
                storage_name: Some(guest::c_string(m, guest::u32_at(m, at + 4)?)?),
            },
            BLOB_TYPE_EVP => BlobRequest::Evp {
                remote_name: guest::c_string(m, guest::u32_at(m, at)?)?,
                storage_name: None,
            },
            BLOB_TYPE_AZURE_BLOB => BlobRequest::AzureBlob {
                url: guest::c_string(m, guest::u32_at(m, at)?)?,
            },
            _ => BlobRequest::Http {
                url: guest::c_string(m, guest::u32_at(m, at)?)?,
            },
        };
        Ok((store, request))
    });
    let filename = match store {
        LocalStore::File(filename) => filename,
        LocalStore::Memory { io_cb, blob_len } => {
            let Some(direction) = Direction::from_code(op.unsigned_abs()) else {
                return Ok(code(EvpResult::Inval));
            };
            let asked = Asked {
                direction,
                kind,
                request,
                io_cb,
                user,
                cb: guest_callback(&wire_callback(cb, user)),
                blob_len,
            };
            return Ok(memory_blob::start(&mut caller, asked));
        }
    };
    let request = Request::BlobOperation {
        kind,
        op: op.unsigned_abs(),
        request,
        filename,
        cb: wire_callback(cb, user),
    };
    Ok(code(caller.data().sdk().simple(&request)))
}

fn http_ext_initialize(mut caller: Caller<'_, HostState>) -> wasmtime::Result<i32> {
    let zeroed = [0u8; HttpExtRequest::SIZE as usize];
    Ok(hand_in(&mut caller, &zeroed)?.unwrap_or(0))
}

fn http_ext_add_header(
    mut caller: Caller<'_, HostState>,
    req: i32,
    name: i32,
    value: i32,
) -> wasmtime::Result<i32> {
    let header = args!(&mut caller, |m| Ok(format!(
        "{}: {}",
        guest::c_string(m, name as u32)?,
        guest::c_string(m, value as u32)?
    )));
    add_header(&mut caller, req, &header)
}

fn http_ext_add_azure_header(mut caller: Caller<'_, HostState>, req: i32) -> wasmtime::Result<i32> {
    add_header(&mut caller, req, "x-ms-blob-type: BlockBlob")
}

/// Appends a `"name: value"` string: a new pointer array replaces the old one, which is freed.
fn add_header(caller: &mut Caller<'_, HostState>, req: i32, header: &str) -> wasmtime::Result<i32> {
    let (mut request, mut pointers) = args!(caller, |m| {
        let r = HttpExtRequest::read(m, req as u32)?;
        let p = r.header_pointers(m)?;
        Ok((r, p))
    });
    if request.nheaders >= abi::MAX_HTTP_EXT_HEADERS {
        return Ok(code(EvpResult::TooBig));
    }
    let Some(text) = hand_in(caller, &guest::nul_terminated(header))? else {
        return Ok(code(EvpResult::NoMem));
    };
    pointers.push(text as u32);
    let array: Vec<u8> = pointers.iter().flat_map(|p| p.to_le_bytes()).collect();
    let Some(new_array) = hand_in(caller, &array)? else {
        release(caller, text)?;
        return Ok(code(EvpResult::NoMem));
    };
    let old_array = request.headers;
    request.headers = new_array as u32;
    request.nheaders += 1;
    if let Err(e) = with_memory(caller, |m| request.write(m, req as u32))? {
        return Ok(super::guest_code(&e));
    }
    release(caller, old_array as i32)?;
    Ok(code(EvpResult::Ok))
}

fn http_ext_set_url(
    mut caller: Caller<'_, HostState>,
    req: i32,
    url: i32,
) -> wasmtime::Result<i32> {
    let (mut request, url) = args!(&mut caller, |m| Ok((
        HttpExtRequest::read(m, req as u32)?,
        guest::c_string(m, url as u32)?
    )));
    let Some(copy) = hand_in(&mut caller, &guest::nul_terminated(&url))? else {
        return Ok(code(EvpResult::NoMem));
    };
    let old = request.url;
    request.url = copy as u32;
    if let Err(e) = with_memory(&mut caller, |m| request.write(m, req as u32))? {
        return Ok(super::guest_code(&e));
    }
    release(&mut caller, old as i32)?;
    Ok(code(EvpResult::Ok))
}

fn http_ext_free(mut caller: Caller<'_, HostState>, req: i32) -> wasmtime::Result<()> {
    if req == 0 {
        return Ok(());
    }
    let Ok((request, pointers)) = read(&mut caller, |m| {
        let r = HttpExtRequest::read(m, req as u32)?;
        let p = r.header_pointers(m)?;
        Ok((r, p))
    })?
    else {
        return Ok(());
    };
    for p in pointers {
        release(&mut caller, p as i32)?;
    }
    release(&mut caller, request.headers as i32)?;
    release(&mut caller, request.url as i32)?;
    release(&mut caller, req)
}

/// Asks sdk-broker whether the manifest declares the stream; it declares none yet, so the
/// answer is its refusal (`EVP_INVAL`), or `EVP_NOTSUP` should it ever accept one.
fn stream_open(caller: &mut Caller<'_, HostState>, name: i32) -> wasmtime::Result<i32> {
    let name = args!(caller, |m| guest::c_string(m, name as u32));
    let request = Request::StreamParamsRequest { name: Some(name) };
    Ok(match caller.data().sdk().call(&request) {
        Ok(Response::StreamParams { result, .. }) if result != EvpResult::Ok => code(result),
        Ok(Response::Simple(result)) if result != EvpResult::Ok => code(result),
        Ok(_) => code(EvpResult::NotSup),
        Err(e) => code(e.result()),
    })
}

/// `EVP_streamInputOpen(h, name, cb, user, stream_out)` and
/// `EVP_streamOutputOpen(h, name, stream_out)`: only `h` and `name` matter while no stream can
/// be opened.
fn stream_open_call(mut caller: Caller<'_, HostState>, h: i32, name: i32) -> wasmtime::Result<i32> {
    check_handle!(h);
    stream_open(&mut caller, name)
}

fn stream_close(_caller: Caller<'_, HostState>, h: i32, _stream: i32) -> wasmtime::Result<i32> {
    check_handle!(h);
    // No stream can be open.
    Ok(code(EvpResult::Inval))
}

fn stream_write(
    _caller: Caller<'_, HostState>,
    h: i32,
    _stream: i32,
    _buf: i32,
    _len: i32,
) -> wasmtime::Result<i32> {
    check_handle!(h);
    Ok(code(EvpResult::Inval))
}
