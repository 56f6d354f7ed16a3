//! evpctl: the operator's command line on the device, over D-Bus.
