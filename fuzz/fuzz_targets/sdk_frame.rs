//! The SDK socket's framing as sdk-broker reads it: a stream of 16-byte headers, each checked
//! before its payload is read, then the payload decoded as a request.
#![no_main]

use evp_schemas::sdk::{
    HEADER_LEN, Header, HeaderError, MAX_PAYLOAD, Request, encode_frame, read_frame,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.first_chunk::<HEADER_LEN>() {
        let h = Header::parse(head);
        assert_eq!(&h.to_bytes(), head, "a header reads back as its bytes");
        match h.check() {
            Ok(()) => assert!(h.zero == 0 && h.size > 0 && h.size as usize <= MAX_PAYLOAD),
            Err(HeaderError::NonZeroReserved(z)) => assert!(z != 0 && z == h.zero),
            Err(HeaderError::ZeroSize) => assert!(h.zero == 0 && h.size == 0),
            Err(HeaderError::TooBig(n)) => assert!(h.zero == 0 && n as usize > MAX_PAYLOAD),
        }
    }
    let mut stream = data;
    while let Ok((header, payload)) = read_frame(&mut stream) {
        assert_eq!(payload.len(), header.size as usize);
        assert_eq!(header.check(), Ok(()));
        let frame = encode_frame(header.xid, &payload).expect("a frame read is a frame written");
        assert_eq!(Header::parse(frame.first_chunk().unwrap()), header);
        if let Ok(request) = Request::decode(&payload) {
            assert_eq!(Request::decode(&request.encode()).as_ref(), Ok(&request));
        }
    }
});
