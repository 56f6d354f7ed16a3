//! The blob and stream functions of the SDK. Blob transfers are not served yet
//! (`EVP_blobOperation` answers `EVP_NOTSUP`, as sdk-broker does for remote modules); the
//! `EVP_BlobRequestHttpExt_*` helpers only manage a struct in guest memory, so they work.
//! Streams are asked of sdk-broker, which declares none.

use evp_schemas::sdk::{EvpResult, Request, Response};
use wasmtime::{Caller, Linker};

use super::{HostState, args, check_handle, code, hand_in, read, release, with_memory};
use crate::abi::{self, IMPORT_MODULE, MAX_BLOB_TYPE};
use crate::guest::{self, HttpExtRequest};

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

#[allow(clippy::too_many_arguments)]
fn blob_operation(
    _caller: Caller<'_, HostState>,
    h: i32,
    kind: i32,
    _op: i32,
    _request: i32,
    _local_store: i32,
    _cb: i32,
    _user: i32,
) -> wasmtime::Result<i32> {
    check_handle!(h);
    if !(0..=MAX_BLOB_TYPE).contains(&kind) {
        return Ok(code(EvpResult::Inval));
    }
    Ok(code(EvpResult::NotSup))
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
