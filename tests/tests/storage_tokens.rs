//! EVP storage uploads (`EVP_BLOB_TYPE_EVP_EXT`) of a spawned module (`evp-test-blob`): sdk-broker
//! asks hubd for the storage token (`Hub1.RequestStorageToken`), hubd asks the hub driver over
//! MQTT, and the file goes where the hub's answer says, with its headers, checked byte for
//! byte on an HTTP server on loopback. Offline, a kept `multifile` answer serves.

use evp_devhub::{DeviceReport, StorageAnswer};
use evp_system_tests::both_protocols;
use evp_system_tests::http::FileServer;
use evp_system_tests::system::{System, blob_outcome, deploy_and_wait, deployment_of, wait_state};
use evp_system_tests::{DEADLINE, wait_for};
use serde_json::{Value, json};

/// The outcome of a successful upload, as the module's callback sees it.
fn uploaded() -> Value {
    json!({"reason": "DONE", "result": 0, "http_status": 201, "error": 0})
}

both_protocols! {
    async fn an_evp_ext_upload_goes_where_the_hubs_storage_token_says(protocol) {
        let sys = System::start_speaking(protocol).await.unwrap();
        let root = tempfile::tempdir().unwrap();
        let server = FileServer::start(root.path().to_path_buf()).unwrap();
        let headers = [("x-ms-blob-type".to_owned(), "BlockBlob".to_owned())];
        sys.hub.set_storage(Some(StorageAnswer::SingleFile {
            base_url: server.url(""),
            headers: headers.clone().into(),
        }));
        let mut seen = sys.hub.subscribe();
        deploy_and_wait(&sys, &deployment_of("dep-1", &[("blob", "evp-test-blob")])).await;
        let workspace = sys.instance_dir("blob").join("default_workspace");
        let payload: Vec<u8> = (0..1_000_003u32).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(workspace.join("frame.bin"), &payload).unwrap();

        let ask = json!({"op": "put", "type": 3, "remote_name": "cam1/0001.bin", "file": "frame.bin"});
        assert_eq!(blob_outcome(&sys, "blob", "up", ask).await, uploaded());
        // The hub was asked as EVP asks: the remote name, the instance, no key for the default
        // storage.
        let request = wait_for(
            "the hub to see the storage token request",
            DEADLINE,
            async || {
                match seen.try_recv() {
                    Ok(DeviceReport::StorageTokenRequest(r)) => Some(Some(r)),
                    Ok(_) => None,
                    Err(_) => Some(None),
                }
                .flatten()
            },
        )
        .await
        .unwrap();
        assert_eq!(request["filename"], "cam1/0001.bin");
        assert_eq!(request["moduleInstanceId"], "blob");
        assert!(request.get("key").is_none(), "{request}");
        // The bytes are the file's, at the URL the hub gave, with its headers.
        let stored = root.path().join("cam1%2F0001.bin");
        assert!(
            std::fs::read(&stored).unwrap() == payload,
            "uploaded bytes differ"
        );
        let put = server
            .requests()
            .into_iter()
            .find(|r| r.method == "PUT" && r.name == "cam1%2F0001.bin")
            .expect("the PUT");
        assert!(
            put.headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case("x-ms-blob-type") && v == "BlockBlob"),
            "{put:?}"
        );

        // EVP storage is for uploads: a GET is EVP_NOTSUP at once, as EVP answers.
        let get = json!({"op": "get", "type": 3, "remote_name": "x", "file": "x.bin"});
        assert_eq!(
            blob_outcome(&sys, "blob", "down", get).await,
            json!({"refused": "EVP_NOTSUP"})
        );

        // The hub refuses: the callback says ERROR with EIO, and nothing is sent.
        sys.hub
            .set_storage(Some(StorageAnswer::Refuse("quota exceeded".into())));
        let before = server.request_count();
        let ask = json!({"op": "put", "type": 3, "remote_name": "n.bin", "file": "frame.bin",
            "storage": "archive"});
        assert_eq!(
            blob_outcome(&sys, "blob", "full", ask).await,
            json!({"reason": "DONE", "result": 1, "http_status": 0, "error": 5})
        );
        assert_eq!(
            server.request_count(),
            before,
            "nothing sent without a token"
        );
        sys.stop().await;
    }
}

both_protocols! {
    async fn offline_an_upload_uses_the_kept_multifile_token(protocol) {
        let mut sys = System::start_speaking(protocol).await.unwrap();
        let root = tempfile::tempdir().unwrap();
        let server = FileServer::start(root.path().to_path_buf()).unwrap();
        sys.hub.set_storage(Some(StorageAnswer::MultiFile {
            url: format!("{}?sig=s3cret", server.url("")),
            headers: Default::default(),
            expires_at_ms: None,
        }));
        deploy_and_wait(&sys, &deployment_of("dep-1", &[("blob", "evp-test-blob")])).await;
        let workspace = sys.instance_dir("blob").join("default_workspace");
        std::fs::write(workspace.join("a.txt"), b"first").unwrap();
        let ask = json!({"op": "put", "type": 3, "remote_name": "a.txt", "file": "a.txt"});
        assert_eq!(blob_outcome(&sys, "blob", "one", ask).await, uploaded());
        assert_eq!(std::fs::read(root.path().join("a.txt")).unwrap(), b"first");

        // The hub goes away: the container URL the hub gave serves the next upload.
        sys.mosquitto.stop();
        let hub = evp_schemas::dbus::Hub1Proxy::builder(&sys.conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .unwrap();
        wait_for("hubd to see the broker gone", DEADLINE, async || {
            hub.connection().await.ok().filter(|c| c != "connected")
        })
        .await
        .unwrap();
        std::fs::write(workspace.join("b.txt"), b"second, offline").unwrap();
        let ask = json!({"op": "put", "type": 3, "remote_name": "b.txt", "file": "b.txt"});
        // The hub cannot send the configuration now: it is handed to sdk-broker on the bus, as
        // hubd would.
        let broker = evp_schemas::dbus::SdkBroker1Proxy::new(&sys.conn)
            .await
            .unwrap();
        broker
            .deliver_configuration("blob", "two", ask.to_string().as_bytes())
            .await
            .unwrap();
        let file = root.path().join("b.txt");
        wait_for("the offline upload", DEADLINE, async || {
            std::fs::read(&file)
                .ok()
                .filter(|b| b == b"second, offline")
        })
        .await
        .unwrap();
        let put = server
            .requests()
            .into_iter()
            .find(|r| r.name == "b.txt")
            .unwrap();
        assert_eq!(put.query.as_deref(), Some("sig=s3cret"));
        // Back online, the module's outcome reaches the hub.
        sys.mosquitto.restart().unwrap();
        let outcome = wait_state(&sys, "state/blob/two", |_| true).await;
        let outcome: Value = serde_json::from_str(outcome.as_str().unwrap_or_default()).unwrap();
        assert_eq!(outcome, uploaded());
        sys.stop().await;
    }
}
