//! Test modules written with evp-sdk (work in progress).
#![deny(missing_docs)]
