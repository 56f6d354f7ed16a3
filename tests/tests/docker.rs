//! Docker modules on the machine's real Docker engine, seen from the hub driver: test images
//! are built here from the workspace's test modules (`evp_system_tests::docker`), never
//! pulled. Container names are global to the engine, so each test uses instance names of its
//! own (`dk-…`). A test that cannot reach the engine fails, with the reason.

use evp_system_tests::docker::{
    EngineProxy, docker, has_image, import_module_image, inspect, remove_agent_containers,
    remove_image, require_engine, running_container, save_image,
};
use evp_system_tests::system::{
    Options, System, commands_are_answered, deploy_and_wait, deploy_until_module_error,
    echo_round_trip, instance_status, workspace_module,
};
use evp_system_tests::{DEADLINE, bin_dir, wait_for};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A docker module whose `downloadUrl` is `url` (an image reference, or an archive with `hash`).
fn docker_module(url: &str, hash: Option<&str>) -> Value {
    let mut m = json!({"moduleImpl": "docker", "entryPoint": "main", "downloadUrl": url});
    if let Some(h) = hash {
        m["hash"] = json!(h);
    }
    m
}

/// `instances` (instance → module id) of `modules`.
fn deployment(id: &str, instances: &[(&str, &str)], modules: &[(&str, Value)]) -> Value {
    let mut d = json!({
        "deploymentId": id, "instanceSpecs": {}, "modules": {},
        "publishTopics": {}, "subscribeTopics": {}
    });
    for (name, module) in instances {
        d["instanceSpecs"][*name] = json!({"moduleId": module, "publish": {}, "subscribe": {}});
    }
    for (id, module) in modules {
        d["modules"][*id] = module.clone();
    }
    d
}

/// Makes image `tag` of workspace test module `binary`, in the system's directory.
fn image(sys: &System, tag: &str, binary: &str) {
    require_engine().unwrap();
    import_module_image(tag, &bin_dir().join(binary), sys.dir.path()).unwrap();
}

/// Waits until no container is named `name`.
async fn wait_container_gone(name: &str) {
    wait_for(
        &format!("container {name} to be removed"),
        DEADLINE,
        async || inspect(name, "{{.Id}}").is_err().then_some(()),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_modules_echo_configuration_answer_commands_and_run_locked_down() {
    let sys = System::start().await.unwrap();
    let (echo_tag, rpc_tag) = (
        "localhost/evp-test/config-echo:1",
        "localhost/evp-test/rpc-echo:1",
    );
    image(&sys, echo_tag, "evp-test-config-echo");
    image(&sys, rpc_tag, "evp-test-rpc-echo");
    // The echo module goes air-gapped: a `docker save` archive at a file:// URL with its hash,
    // and its image gone from the engine, so only the archive can bring it back.
    let archive = sys.modules_dir().join("config-echo.tar");
    save_image(echo_tag, &archive).unwrap();
    remove_image(echo_tag);
    let hash = hex::encode(Sha256::digest(std::fs::read(&archive).unwrap()));
    let url = format!("file://{}", archive.display());
    let d = deployment(
        "dep-1",
        &[("dk-echo", "echo"), ("dk-rpc", "rpc")],
        &[
            ("echo", docker_module(&url, Some(&hash))),
            ("rpc", docker_module(rpc_tag, None)),
        ],
    );
    deploy_and_wait(&sys, &d).await;

    echo_round_trip(&sys, "dk-echo", "greeting", "hello").await;
    commands_are_answered(&sys, "dk-rpc", 501).await;

    // Locked down: no network, no capability, no privilege escalation, not root, and the
    // instance directory at EVP's path.
    let check = |template: &str, expect: &str| {
        assert_eq!(inspect("dk-echo", template).unwrap(), expect, "{template}");
    };
    check("{{.HostConfig.NetworkMode}}", "none");
    check("{{.HostConfig.Privileged}}", "false");
    check("{{json .HostConfig.CapDrop}}", r#"["ALL"]"#);
    check(
        "{{json .HostConfig.SecurityOpt}}",
        r#"["no-new-privileges"]"#,
    );
    let user = inspect("dk-echo", "{{.Config.User}}").unwrap();
    let uid: u32 = user.split(':').next().unwrap().parse().unwrap();
    assert!(
        (sys.uids.min..=sys.uids.max).contains(&uid),
        "runs as {user}, not an instance uid"
    );
    let mounts = inspect("dk-echo", "{{range .Mounts}}{{.Destination}} {{end}}").unwrap();
    let mut mounts: Vec<&str> = mounts.split_whitespace().collect();
    mounts.sort_unstable();
    assert_eq!(mounts, ["/evp", "/evp/sdk.sock"]);
    // Its output is in the instance's log, as a spawned module's is.
    let log = sys.instance_dir("dk-echo").join("logs").join("stdout.log");
    wait_for("the container's output in its log", DEADLINE, async || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("config-echo: configuration greeting")
            .then_some(())
    })
    .await
    .unwrap();

    // Undeployed: the containers go, and so does the image the agent brought (loaded from
    // the archive); the one that was on the device before it is the operator's, and stays.
    deploy_and_wait(&sys, &deployment("dep-2", &[], &[])).await;
    wait_container_gone("dk-echo").await;
    wait_container_gone("dk-rpc").await;
    wait_for("the archive's image to be removed", DEADLINE, async || {
        has_image(echo_tag).is_err().then_some(())
    })
    .await
    .unwrap();
    has_image(rpc_tag).unwrap();
    sys.stop().await;
    remove_image(echo_tag);
    remove_image(rpc_tag);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_outlives_a_kill_of_its_runtime_and_is_readopted() {
    let sys = System::start().await.unwrap();
    let tag = "localhost/evp-test/config-echo-adopt:1";
    image(&sys, tag, "evp-test-config-echo");
    let d = deployment(
        "dep-1",
        &[("dk-adopt", "echo")],
        &[("echo", docker_module(tag, None))],
    );
    deploy_and_wait(&sys, &d).await;
    echo_round_trip(&sys, "dk-adopt", "t", "before").await;
    let before = running_container("dk-adopt").expect("the container runs");

    sys.kill_and_start("evp-runtimed-container").await.unwrap();
    // The same container, never restarted, and its SDK connection is served again.
    echo_round_trip(&sys, "dk-adopt", "t", "after").await;
    assert_eq!(running_container("dk-adopt"), Some(before.clone()));
    let restarts = inspect("dk-adopt", "{{.RestartCount}} {{.State.StartedAt}}").unwrap();
    assert!(restarts.starts_with("0 "), "{restarts}");

    sys.stop().await;
    remove_agent_containers(&["dk-adopt"]);
    remove_image(tag);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_engine_is_a_clear_error_and_other_kinds_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-docker.sock");
    let sys = System::start_with(Options {
        env: vec![(
            "EVP_DOCKER_UNIX_SOCKET".into(),
            socket.to_string_lossy().into_owned(),
        )],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut d = deployment(
        "dep-1",
        &[("dk-none", "img"), ("echo", "evp-test-config-echo")],
        &[("img", docker_module("localhost/evp-test/absent:1", None))],
    );
    d["modules"]["evp-test-config-echo"] = workspace_module("evp-test-config-echo");
    sys.deploy(&d).await.unwrap();
    let expected = format!("Docker engine not reachable at unix://{}", socket.display());
    let status = sys
        .wait_status(|s| {
            s["deploymentId"] == "dep-1"
                && instance_status(s, "echo") == "ok"
                && s["modules"]["img"]["failureMessage"]
                    .as_str()
                    .is_some_and(|m| m.contains(&expected))
        })
        .await
        .unwrap();
    assert_eq!(status["modules"]["img"]["status"], "error", "{status}");
    assert_ne!(instance_status(&status, "dk-none"), "ok");
    echo_round_trip(&sys, "echo", "still", "working").await;
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_archive_hash_fails_the_module_and_starts_nothing() {
    require_engine().unwrap();
    let sys = System::start().await.unwrap();
    let tag = "localhost/evp-test/config-echo-hash:1";
    image(&sys, tag, "evp-test-config-echo");
    let archive = sys.modules_dir().join("echo.tar");
    save_image(tag, &archive).unwrap();
    let wrong = hex::encode(Sha256::digest(b"not the archive"));
    let url = format!("file://{}", archive.display());
    let d = deployment(
        "dep-1",
        &[("dk-hash", "echo")],
        &[("echo", docker_module(&url, Some(&wrong)))],
    );
    sys.deploy(&d).await.unwrap();
    let status = sys
        .wait_status(|s| s["deploymentId"] == "dep-1" && s["modules"]["echo"]["status"] == "error")
        .await
        .unwrap();
    assert_eq!(
        status["modules"]["echo"]["failureMessage"], "Module hash mismatch",
        "{status}"
    );
    assert!(running_container("dk-hash").is_none());
    let listed = docker(&[
        "ps",
        "-a",
        "--filter",
        "name=^dk-hash$",
        "--format",
        "{{.ID}}",
    ]);
    assert_eq!(listed.unwrap(), "");
    sys.stop().await;
    remove_image(tag);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_engine_lost_mid_way_is_an_error_and_the_instance_comes_back_with_it() {
    require_engine().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("engine.sock");
    let mut engine = EngineProxy::start(&socket).unwrap();
    let sys = System::start_with(Options {
        env: vec![(
            "EVP_DOCKER_UNIX_SOCKET".into(),
            socket.to_string_lossy().into_owned(),
        )],
        extra_toml: "[reconciler]\nrestart_backoff_base_ms = 100\nrestart_backoff_max_ms = 500\n"
            .into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let tag = "localhost/evp-test/config-echo-cut:1";
    image(&sys, tag, "evp-test-config-echo");
    let mut d = deployment(
        "dep-1",
        &[("dk-cut", "echo")],
        &[("echo", docker_module(tag, None))],
    );
    d["instanceSpecs"]["dk-cut"]["restartPolicy"] = json!("always");
    deploy_and_wait(&sys, &d).await;
    echo_round_trip(&sys, "dk-cut", "t", "before").await;
    let before = running_container("dk-cut").expect("the container runs");

    engine.cut();
    let expected = format!("Docker engine not reachable at unix://{}", socket.display());
    sys.wait_status(|s| {
        s["instances"]["dk-cut"]["status"] == "error"
            && s["instances"]["dk-cut"]["failureMessage"]
                .as_str()
                .is_some_and(|m| m.contains(&expected))
    })
    .await
    .unwrap();

    engine.resume().unwrap();
    sys.wait_status(|s| instance_status(s, "dk-cut") == "ok")
        .await
        .unwrap();
    echo_round_trip(&sys, "dk-cut", "t", "after").await;
    let after = running_container("dk-cut").expect("the container runs again");
    assert_ne!(
        after, before,
        "the instance was started again in a new container"
    );
    sys.stop().await;
    remove_agent_containers(&["dk-cut"]);
    remove_image(tag);
}

#[tokio::test(flavor = "multi_thread")]
async fn manifest_container_options_reach_the_container_and_a_change_restarts_it() {
    let sys = System::start().await.unwrap();
    let tag = "localhost/evp-test/config-echo-opts:1";
    image(&sys, tag, "evp-test-config-echo");
    let with = |id: &str, memory: u64| {
        let mut d = deployment(
            id,
            &[("dk-opts", "echo")],
            &[("echo", docker_module(tag, None))],
        );
        d["instanceSpecs"]["dk-opts"]["container"] = json!({
            "network": "bridge", "memoryBytes": memory, "nanoCpus": 250_000_000u64,
            "capAdd": ["NET_BIND_SERVICE"]
        });
        d
    };
    deploy_and_wait(&sys, &with("dep-1", 64 << 20)).await;
    let check = |template: &str, expect: &str| {
        assert_eq!(inspect("dk-opts", template).unwrap(), expect, "{template}");
    };
    check("{{.HostConfig.NetworkMode}}", "bridge");
    check("{{.HostConfig.Memory}}", &(64u64 << 20).to_string());
    check("{{.HostConfig.NanoCpus}}", "250000000");
    check("{{json .HostConfig.CapAdd}}", r#"["NET_BIND_SERVICE"]"#);
    check("{{json .HostConfig.CapDrop}}", r#"["ALL"]"#);
    echo_round_trip(&sys, "dk-opts", "t", "one").await;

    deploy_and_wait(&sys, &with("dep-2", 128 << 20)).await;
    wait_for(
        "the container restarted with the new limit",
        DEADLINE,
        async || {
            let memory = inspect("dk-opts", "{{.HostConfig.Memory}}").ok()?;
            (memory == (128u64 << 20).to_string()).then_some(())
        },
    )
    .await
    .unwrap();
    echo_round_trip(&sys, "dk-opts", "t", "two").await;

    // Options a container cannot take refuse the whole manifest, naming the field.
    let mut bad = with("dep-3", 64 << 20);
    bad["instanceSpecs"]["dk-opts"]["container"]["capAdd"] = json!(["ALL"]);
    sys.deploy(&bad).await.unwrap();
    let status = sys
        .wait_status(|s| s["deploymentId"] == "dep-3")
        .await
        .unwrap();
    assert_eq!(status["reconcileStatus"], "error", "{status}");
    let message = status["failureMessage"].as_str().unwrap_or_default();
    assert!(message.contains("capAdd"), "{status}");
    assert!(
        running_container("dk-opts").is_some(),
        "the refused manifest changed something"
    );
    sys.stop().await;
    remove_agent_containers(&["dk-opts"]);
    remove_image(tag);
}

/// A registry on loopback that asks for Basic credentials and knows no image: enough to see
/// what the engine sends it on the agent's behalf. Returns its port and the `Authorization`
/// headers it was sent.
fn fake_registry() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut auth = None;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.strip_prefix("Authorization: ") {
                            auth = Some(v.trim().to_owned());
                        }
                    }
                    let answer = match auth {
                        None => {
                            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n"
                        }
                        Some(a) => {
                            log.lock().unwrap().push(a);
                            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                        }
                    };
                    if stream.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// `X-Registry-Auth` for `user`:`password`, as a registry-auth map holds it.
fn registry_auth_value(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let creds = json!({"username": user, "password": password}).to_string();
    base64::engine::general_purpose::STANDARD.encode(creds)
}

/// Deploys an image of `registry` (a [`fake_registry`]) and asserts the registry was sent
/// Basic `user`:`password` on the device's behalf.
async fn pull_authenticates(
    sys: &System,
    registry: &str,
    seen: &std::sync::Mutex<Vec<String>>,
    (user, password): (&str, &str),
) {
    use base64::Engine as _;
    let image = format!("{registry}/evp-test/none:1");
    let d = deployment(
        "dep-1",
        &[("dk-auth", "m")],
        &[("m", docker_module(&image, None))],
    );
    let (status, message) = deploy_until_module_error(sys, &d, "m").await;
    assert!(message.contains(&image), "{status}");
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    );
    assert!(
        seen.lock().unwrap().contains(&expected),
        "the registry saw {:?}",
        seen.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_carries_the_registry_credentials_of_its_registry() {
    require_engine().unwrap();
    let (port, seen) = fake_registry();
    let registry = format!("localhost:{port}");
    let auth = json!({ registry.clone(): registry_auth_value("fleet", "s3cret") });
    let sys = System::start_with(Options {
        env: vec![("EVP_REGISTRY_AUTH".into(), auth.to_string())],
        ..Default::default()
    })
    .await
    .unwrap();
    pull_authenticates(&sys, &registry, &seen, ("fleet", "s3cret")).await;
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_carries_the_credentials_the_hubs_device_configuration_sets() {
    require_engine().unwrap();
    let (port, seen) = fake_registry();
    let registry = format!("localhost:{port}");
    // Nothing local: the credentials come from the hub only, through hubd (EVP2 sends all four
    // keys of the device configuration, null for those it leaves alone).
    let sys = System::start().await.unwrap();
    let auth = json!({ registry.clone(): registry_auth_value("from-hub", "h0b") });
    sys.hub
        .set_device_config(&json!({
            "configuration/$agent/report-status-interval-min": null,
            "configuration/$agent/report-status-interval-max": null,
            "configuration/$agent/configuration-id": null,
            "configuration/$agent/registry-auth": auth
        }))
        .await
        .unwrap();
    let applied = |r: &Value| r["state/$agent/registry-auth"].get(&registry).is_some();
    sys.hub.wait_for_status(applied, DEADLINE).await.unwrap();
    pull_authenticates(&sys, &registry, &seen, ("from-hub", "h0b")).await;
    sys.stop().await;
}
