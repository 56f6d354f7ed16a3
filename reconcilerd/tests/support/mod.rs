//! What the download tests share.

pub mod http;
