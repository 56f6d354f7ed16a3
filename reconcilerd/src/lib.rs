//! evp-agent reconcilerd: the desired deployment, module downloads, reconciliation, status.
