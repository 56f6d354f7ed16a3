use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::config::{HubSection, TlsFiles, resolve};

fn cfg() -> HubConfig {
    let section = HubSection {
        mqtt_host: Some("h".into()),
        mqtt_port: Some(1883),
        ..HubSection::default()
    };
    resolve(section, |_| None).unwrap()
}

fn key() -> ProvisionKey {
    ProvisionKey {
        key: "k".into(),
        secret: "very-secret".into(),
    }
}

fn token(t: &str) -> Credentials {
    Credentials::AccessToken { token: t.into() }
}

#[test]
fn configured_credentials_win_then_stored_ones_then_provisioning() {
    let mut c = cfg();
    assert_eq!(
        plan(&c, None),
        Plan::AsConfigured,
        "nothing to provision with"
    );
    c.provision = Some(key());
    assert_eq!(plan(&c, None), Plan::Provision(key()));
    assert_eq!(plan(&c, Some(token("t"))), Plan::Stored(token("t")));
    let mut configured = c.clone();
    configured.username = Some("u".into());
    assert_eq!(plan(&configured, Some(token("t"))), Plan::AsConfigured);
    let mut configured = c.clone();
    configured.password = Some("p".into());
    assert_eq!(plan(&configured, None), Plan::AsConfigured);
    let mut configured = c;
    configured.tls = Some(TlsFiles {
        ca_cert: "/ca".into(),
        client: Some(("/c".into(), "/k".into())),
    });
    assert_eq!(plan(&configured, None), Plan::AsConfigured);
    configured.tls = Some(TlsFiles {
        ca_cert: "/ca".into(),
        client: None,
    });
    assert_eq!(
        plan(&configured, None),
        Plan::Provision(key()),
        "server-authenticated TLS is no credential"
    );
}

#[test]
fn the_request_names_the_device_and_carries_key_and_secret() {
    let sent: Value = serde_json::from_slice(&request("dev-1", &key())).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({
            "deviceName": "dev-1",
            "provisionDeviceKey": "k",
            "provisionDeviceSecret": "very-secret",
        })
    );
    assert!(!format!("{:?}", key()).contains("very-secret"));
}

#[test]
fn answers_are_read_as_thingsboard_writes_them() {
    assert_eq!(
        decode_answer(
            br#"{"status":"SUCCESS","credentialsType":"ACCESS_TOKEN","credentialsValue":"tok"}"#
        ),
        Answer::Granted(token("tok"))
    );
    // The older form of the documentation.
    assert_eq!(
        decode_answer(
            br#"{"provisionDeviceStatus":"SUCCESS","credentialsType":"ACCESS_TOKEN","accessToken":"old"}"#
        ),
        Answer::Granted(token("old"))
    );
    assert_eq!(
        decode_answer(
            br#"{"status":"SUCCESS","credentialsType":"MQTT_BASIC","credentialsValue":{"clientId":"c","userName":"u","password":"p"}}"#
        ),
        Answer::Granted(Credentials::MqttBasic {
            client_id: Some("c".into()),
            user_name: Some("u".into()),
            password: Some("p".into()),
        })
    );
}

#[test]
fn refusals_and_unusable_answers_say_why() {
    let why = |payload: &[u8]| match decode_answer(payload) {
        Answer::Refused(why) => why,
        granted => panic!("{granted:?}"),
    };
    assert_eq!(
        why(br#"{"status":"FAILURE","errorMsg":"Failed to find provision profile"}"#),
        "the hub answered FAILURE: Failed to find provision profile"
    );
    assert!(why(br#"{"status":"NOT_FOUND"}"#).contains("NOT_FOUND: no errorMsg"));
    assert!(why(b"not json").contains("not a JSON object"));
    assert!(why(br#"{"status":"SUCCESS","credentialsType":"ACCESS_TOKEN"}"#).contains("no token"));
    assert!(
        why(br#"{"status":"SUCCESS","credentialsType":"ACCESS_TOKEN","credentialsValue":""}"#)
            .contains("no token")
    );
    assert!(
        why(br#"{"status":"SUCCESS","credentialsType":"MQTT_BASIC","credentialsValue":{"password":"p"}}"#)
            .contains("neither clientId nor userName")
    );
    assert!(
        why(br#"{"status":"SUCCESS","credentialsType":"X509_CERTIFICATE","credentialsValue":"-----BEGIN"}"#)
            .contains("tls_client_cert")
    );
    assert!(why(br#"{"status":"SUCCESS","credentialsType":"LWM2M"}"#).contains("LWM2M"));
    let huge = format!(
        r#"{{"status":"SUCCESS","credentialsType":"ACCESS_TOKEN","credentialsValue":"{}"}}"#,
        "t".repeat(70_000)
    );
    assert!(why(huge.as_bytes()).contains("token of 70000 bytes"));
    assert!(
        why(br#"{"status":"SUCCESS","credentialsType":"MQTT_BASIC","credentialsValue":{"userName":"u","password":"p\u0000"}}"#)
            .contains("password with a NUL")
    );
    let long = format!(
        r#"{{"status":"FAILURE","errorMsg":"{}"}}"#,
        "x".repeat(10_000)
    );
    assert!(why(long.as_bytes()).len() <= MAX_REASON);
}

#[test]
fn credentials_replace_what_the_session_connects_with() {
    let mut c = cfg();
    c.client_id = Some("permanent-id".into());
    token("tok").apply(&mut c);
    assert_eq!(
        (c.username.as_deref(), c.password.as_deref()),
        (Some("tok"), None)
    );
    assert_eq!(c.client_id.as_deref(), Some("permanent-id"));
    Credentials::MqttBasic {
        client_id: None,
        user_name: Some("u".into()),
        password: Some("p".into()),
    }
    .apply(&mut c);
    assert_eq!(c.client_id.as_deref(), Some("permanent-id"));
    assert_eq!(
        (c.username.as_deref(), c.password.as_deref()),
        (Some("u"), Some("p"))
    );
    Credentials::MqttBasic {
        client_id: Some("hub-id".into()),
        user_name: None,
        password: None,
    }
    .apply(&mut c);
    assert_eq!(c.client_id.as_deref(), Some("hub-id"));
    assert_eq!(c.username, None);
    assert!(!format!("{:?}", token("tok")).contains("tok\""));
}

#[test]
fn a_refusal_waits_longer_each_time_and_shows_on_the_connection() {
    let mut retries = Retries::default();
    let mut last = Duration::ZERO;
    for attempt in 0..12 {
        let Next::Retry {
            delay,
            state,
            reason,
        } = retries.next(Outcome::Answered(Answer::Refused("no".into())))
        else {
            panic!("a refusal is retried");
        };
        assert_eq!(state, ConnectionState::ProvisioningRefused);
        assert_eq!(reason, "no");
        // Jitter takes off at most a quarter.
        assert!(
            delay >= REFUSED_RETRY_FIRST * 3 / 4 && delay <= REFUSED_RETRY_MAX,
            "{delay:?}"
        );
        if attempt < 6 {
            assert!(delay > last, "attempt {attempt}: {delay:?} after {last:?}");
        }
        last = delay;
    }
    assert!(last >= REFUSED_RETRY_MAX * 3 / 4, "{last:?}");
    // A missing broker is a reconnect, not a refusal, and has its own schedule.
    let Next::Retry { delay, state, .. } = retries.next(Outcome::NoAnswer("down".into())) else {
        panic!("retried");
    };
    assert_eq!(state, ConnectionState::Disconnected);
    assert!(delay <= Duration::from_secs(1), "{delay:?}");
    assert_eq!(
        retries.next(Outcome::Answered(Answer::Granted(token("t")))),
        Next::Keep(token("t"))
    );
}

#[test]
fn credentials_are_kept_for_hubd_alone_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    assert!(store::load(dir.path()).unwrap().is_none());
    for credentials in [
        token("tok"),
        Credentials::MqttBasic {
            client_id: Some("c".into()),
            user_name: None,
            password: Some("p".into()),
        },
    ] {
        let path = store::save(dir.path(), &credentials).unwrap();
        assert_eq!(store::load(dir.path()).unwrap(), Some(credentials));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
}

#[test]
fn a_damaged_file_is_an_error_naming_it_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(store::FILE);
    for damaged in [
        "{\"credentialsType\":\"ACCESS_TOKEN\",\"tok",
        "{\"credentialsType\":\"PIN\",\"token\":\"secret-token\"}",
        "",
    ] {
        std::fs::write(&path, damaged).unwrap();
        let e = store::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains(store::FILE) && e.contains("remove it"), "{e}");
        assert!(!e.contains("secret-token"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), damaged);
    }
}

#[test]
fn a_write_cut_short_leaves_the_previous_credentials() {
    let dir = tempfile::tempdir().unwrap();
    store::save(dir.path(), &token("old")).unwrap();
    // What a power cut before the rename leaves: a partial temporary file beside the old one.
    let temp = evp_daemon::fs::temp_path(&dir.path().join(store::FILE));
    std::fs::write(&temp, "{\"credentialsType\":\"ACC").unwrap();
    assert_eq!(store::load(dir.path()).unwrap(), Some(token("old")));
    store::save(dir.path(), &token("new")).unwrap();
    assert_eq!(store::load(dir.path()).unwrap(), Some(token("new")));
}
