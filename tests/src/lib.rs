//! Whole-system tests of evp-agent: private dbus-daemon, mosquitto, the five daemons as processes.
