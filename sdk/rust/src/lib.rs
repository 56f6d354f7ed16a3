//! The EVP module SDK in Rust (work in progress).
#![deny(missing_docs)]
