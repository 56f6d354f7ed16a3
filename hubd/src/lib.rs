//! evp-agent hubd: the only MQTT connection to the hub.
