//! evp-agent runtimed-container: docker, spawned and python modules.
