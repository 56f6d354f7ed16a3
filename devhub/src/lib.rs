//! evp-devhub: a local hub for development and tests, and the whole agent on a private bus.
