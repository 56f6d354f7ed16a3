//! Module downloads against real HTTP(S) servers and an HTTP proxy on loopback, written here
//! so each fault a gateway's uplink has can be played on demand: transfers cut mid-way, a
//! server that ignores `Range`, a file that changed under the same URL, slow bodies, errors,
//! a proxy with Basic auth and a CONNECT tunnel.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evp_reconcilerd::download::{
    DownloadConfig, DownloadEvent, Downloader, Downloads, EventSink, FetchError, Progress,
    ProxyConfig,
};
use evp_reconcilerd::store::ModuleCache;
use sha2::{Digest, Sha256};
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

mod support;
use support::http::{Server, pki};

/// How long a test waits for something that should happen quickly.
const DEADLINE: Duration = Duration::from_secs(20);

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Bytes that differ from one position to the next, so a misplaced range is caught.
fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    cache_dir: PathBuf,
    downloader: Downloader,
}

fn fixture(config: DownloadConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("modules");
    std::fs::create_dir(&cache_dir).unwrap();
    let downloader = Downloader::new(ModuleCache::new(cache_dir.clone()), &config).unwrap();
    Fixture {
        _dir: dir,
        cache_dir,
        downloader,
    }
}

fn cache_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn no_progress(_: Progress) {}

/// A port on 127.0.0.1 where nothing listens (bound, then released): an origin that can
/// only be reached through a proxy.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn proxy_to(server: &Server, username: Option<&str>, password: Option<&str>) -> ProxyConfig {
    ProxyConfig {
        host: "127.0.0.1".into(),
        port: server.addr.port(),
        username: username.map(str::to_owned),
        password: password.map(str::to_owned),
    }
}

/// `Basic` credentials of `evp-user` / `s3cr:et` (a colon in the password is legal).
const BASIC_EVP_USER: &str = "Basic ZXZwLXVzZXI6czNjcjpldA==";

/// The module is not in the cache and not one byte of it was written.
fn nothing_cached(f: &Fixture, hash: &str) {
    assert!(!f.downloader.cache().contains(hash));
    let partial = f.downloader.cache().partial_of(hash);
    let written = std::fs::metadata(&partial).map_or(0, |m| m.len());
    assert_eq!(written, 0, "{:?}", cache_files(&f.cache_dir));
}

#[tokio::test]
async fn https_downloads_trust_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = pki(dir.path(), "ca.pem");
    let server = Server::start_tls(tls).await;
    let body = content(70_000, 50);
    server.put("m", body.clone(), "\"v\"");
    let f = fixture(DownloadConfig {
        ca_cert: Some(ca),
        ..Default::default()
    });
    let hash = sha(&body);
    let url = server.url("m");
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let path = f.downloader.fetch(&url, &hash, &no_progress).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert_eq!(path, f.downloader.cache().path_of(&hash));
    assert_eq!(cache_files(&f.cache_dir), vec![hash]);
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].method.as_str(), seen[0].status), ("GET", 200));
}

#[tokio::test]
async fn https_downloads_refuse_a_certificate_no_trusted_ca_signed() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, tls) = pki(dir.path(), "ca.pem");
    let (other_ca, _) = pki(dir.path(), "other-ca.pem");
    let server = Server::start_tls(tls).await;
    let body = content(10_000, 51);
    server.put("m", body.clone(), "\"v\"");
    let hash = sha(&body);
    // Only the system's roots, then another CA besides them.
    for ca_cert in [None, Some(other_ca)] {
        let f = fixture(DownloadConfig {
            ca_cert: ca_cert.clone(),
            ..Default::default()
        });
        let e = f
            .downloader
            .fetch(&server.url("m"), &hash, &no_progress)
            .await
            .unwrap_err();
        let FetchError::Transfer(message) = &e else {
            panic!("{ca_cert:?}: {e:?}");
        };
        assert!(
            message.contains("invalid peer certificate: UnknownIssuer"),
            "{ca_cert:?}: {message}"
        );
        assert!(e.is_retryable());
        nothing_cached(&f, &hash);
    }
    assert!(server.seen().is_empty(), "a request went out over TLS");
}

#[tokio::test]
async fn http_downloads_go_through_the_configured_proxy_with_basic_auth() {
    let proxy = Server::start().await;
    let body = content(30_000, 52);
    proxy.put("m", body.clone(), "\"v\"");
    let hash = sha(&body);
    let origin = format!("http://127.0.0.1:{}/m", dead_port());

    // Without the proxy the origin is unreachable.
    let direct = fixture(DownloadConfig::default());
    let e = direct
        .downloader
        .fetch(&origin, &hash, &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Transfer(_)), "{e}");
    assert!(proxy.seen().is_empty());

    let f = fixture(DownloadConfig {
        proxy: Some(proxy_to(&proxy, Some("evp-user"), Some("s3cr:et"))),
        ..Default::default()
    });
    let path = f
        .downloader
        .fetch(&origin, &hash, &no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), body);
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, origin, "absolute-form request to the proxy");
    assert_eq!(seen[0].proxy_authorization.as_deref(), Some(BASIC_EVP_USER));

    // No user, no credentials.
    let anonymous = fixture(DownloadConfig {
        proxy: Some(proxy_to(&proxy, None, None)),
        ..Default::default()
    });
    anonymous
        .downloader
        .fetch(&origin, &hash, &no_progress)
        .await
        .unwrap();
    let seen = proxy.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].target, origin);
    assert_eq!(seen[1].proxy_authorization, None);
}

#[tokio::test]
async fn https_downloads_tunnel_through_the_proxy_and_still_verify_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = pki(dir.path(), "ca.pem");
    let proxy = Server::start().await;
    proxy.behaviour.lock().unwrap().tunnel_tls = Some(tls);
    let body = content(30_000, 53);
    proxy.put("m", body.clone(), "\"v\"");
    let hash = sha(&body);
    let authority = format!("127.0.0.1:{}", dead_port());
    let origin = format!("https://{authority}/m");

    let f = fixture(DownloadConfig {
        proxy: Some(proxy_to(&proxy, Some("evp-user"), Some("s3cr:et"))),
        ca_cert: Some(ca),
        ..Default::default()
    });
    let path = f
        .downloader
        .fetch(&origin, &hash, &no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), body);
    let seen = proxy.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].method, "CONNECT");
    assert_eq!(seen[0].target, authority);
    assert_eq!(seen[0].proxy_authorization.as_deref(), Some(BASIC_EVP_USER));
    // Inside the tunnel: an origin-form request, and the proxy credentials stay outside.
    assert_eq!(
        (seen[1].method.as_str(), seen[1].target.as_str()),
        ("GET", "/m")
    );
    assert_eq!(seen[1].proxy_authorization, None);
    assert_eq!(seen[1].status, 200);

    // The tunnel does not bypass verification: without the CA the certificate is refused.
    let untrusting = fixture(DownloadConfig {
        proxy: Some(proxy_to(&proxy, Some("evp-user"), Some("s3cr:et"))),
        ..Default::default()
    });
    let e = untrusting
        .downloader
        .fetch(&origin, &hash, &no_progress)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("invalid peer certificate: UnknownIssuer"),
        "{e}"
    );
    nothing_cached(&untrusting, &hash);
    let seen = proxy.seen();
    assert_eq!(seen.len(), 3, "only the CONNECT: {seen:?}");
    assert_eq!(seen[2].method, "CONNECT");
}

#[tokio::test]
async fn a_cut_transfer_resumes_with_range_and_if_range() {
    let server = Server::start().await;
    let body = content(100_000, 1);
    server.put("m", body.clone(), "\"v1\"");
    server.behaviour.lock().unwrap().cut = vec![30_000];
    let f = fixture(DownloadConfig::default());
    let hash = sha(&body);

    let e = f
        .downloader
        .fetch(&server.url("m"), &hash, &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Transfer(_)), "{e}");
    let partial = f.downloader.cache().partial_of(&hash);
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 30_000);

    let progress = Arc::new(Mutex::new(Vec::new()));
    let p = progress.clone();
    let record = move |x: Progress| p.lock().unwrap().push(x);
    let path = f
        .downloader
        .fetch(&server.url("m"), &hash, &record)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].range.as_deref(), Some("bytes=30000-"));
    assert_eq!(seen[1].if_range.as_deref(), Some("\"v1\""));
    assert_eq!(seen[1].status, 206);
    let progress = progress.lock().unwrap().clone();
    assert_eq!(
        progress.first(),
        Some(&Progress {
            done: 30_000,
            total: Some(100_000)
        })
    );
    assert_eq!(
        progress.last(),
        Some(&Progress {
            done: 100_000,
            total: Some(100_000)
        })
    );
    assert_eq!(cache_files(&f.cache_dir), vec![hash]);
}

#[tokio::test]
async fn a_server_that_ignores_range_gets_a_fresh_download() {
    let server = Server::start().await;
    let body = content(50_000, 2);
    server.put("m", body.clone(), "\"v1\"");
    {
        let mut b = server.behaviour.lock().unwrap();
        b.cut = vec![20_000];
        b.ignore_range = true;
    }
    let f = fixture(DownloadConfig::default());
    let hash = sha(&body);
    assert!(
        f.downloader
            .fetch(&server.url("m"), &hash, &no_progress)
            .await
            .is_err()
    );
    let path = f
        .downloader
        .fetch(&server.url("m"), &hash, &no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let seen = server.seen();
    assert_eq!(seen[1].range.as_deref(), Some("bytes=20000-"));
    assert_eq!(seen[1].status, 200, "the server ignored the range");
}

#[tokio::test]
async fn a_changed_file_is_downloaded_again_from_the_start() {
    let server = Server::start().await;
    let old = content(40_000, 3);
    let new = content(45_000, 4);
    server.put("m", old, "\"old\"");
    server.behaviour.lock().unwrap().cut = vec![10_000];
    let f = fixture(DownloadConfig::default());
    let hash = sha(&new);
    assert!(
        f.downloader
            .fetch(&server.url("m"), &hash, &no_progress)
            .await
            .is_err()
    );
    // The server now has the file the manifest meant; its validator changed.
    server.put("m", new.clone(), "\"new\"");
    let path = f
        .downloader
        .fetch(&server.url("m"), &hash, &no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), new);
    let seen = server.seen();
    assert_eq!(seen[1].if_range.as_deref(), Some("\"old\""));
    assert_eq!(seen[1].status, 200, "If-Range did not match: whole file");
}

#[tokio::test]
async fn a_resumed_file_that_does_not_hash_right_is_deleted() {
    let server = Server::start().await;
    let good = content(40_000, 5);
    server.put("m", good.clone(), "\"same\"");
    server.behaviour.lock().unwrap().cut = vec![10_000];
    let f = fixture(DownloadConfig::default());
    let hash = sha(&good);
    assert!(
        f.downloader
            .fetch(&server.url("m"), &hash, &no_progress)
            .await
            .is_err()
    );
    // A server that changes the file but not its ETag: the resumed bytes do not fit.
    server.put("m", content(40_000, 6), "\"same\"");
    let e = f
        .downloader
        .fetch(&server.url("m"), &hash, &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::HashMismatch));
    assert_eq!(e.to_string(), "Module hash mismatch");
    assert_eq!(server.seen()[1].status, 206);
    assert!(
        cache_files(&f.cache_dir).is_empty(),
        "{:?}",
        cache_files(&f.cache_dir)
    );
    // The next attempt starts from 0 and, with the right file back, succeeds.
    server.put("m", good.clone(), "\"same\"");
    f.downloader
        .fetch(&server.url("m"), &hash, &no_progress)
        .await
        .unwrap();
    assert_eq!(server.seen()[2].range, None);
}

#[tokio::test]
async fn a_complete_partial_file_needs_no_request() {
    let server = Server::start().await;
    let body = content(5_000, 7);
    let f = fixture(DownloadConfig::default());
    let hash = sha(&body);
    // As a power cut right after the last byte was written and synced leaves it.
    std::fs::write(f.downloader.cache().partial_of(&hash), &body).unwrap();
    let path = f
        .downloader
        .fetch(&server.url("m"), &hash, &no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), body);
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn a_partial_file_longer_than_the_module_starts_over() {
    let server = Server::start().await;
    let body = content(5_000, 8);
    server.put("m", body.clone(), "\"v\"");
    let f = fixture(DownloadConfig::default());
    let hash = sha(&body);
    std::fs::write(f.downloader.cache().partial_of(&hash), content(6_000, 9)).unwrap();
    let path = f
        .downloader
        .fetch(&server.url("m"), &hash, &no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), body);
    let statuses: Vec<u16> = server.seen().iter().map(|s| s.status).collect();
    assert_eq!(statuses, vec![416, 200]);
}

#[tokio::test]
async fn concurrent_downloads_stay_within_the_bound() {
    let server = Server::start().await;
    server.behaviour.lock().unwrap().slow = Some(Duration::from_millis(2));
    let bodies: Vec<Vec<u8>> = (0..6).map(|i| content(20_000, 10 + i)).collect();
    for (i, b) in bodies.iter().enumerate() {
        server.put(&format!("m{i}"), b.clone(), "\"v\"");
    }
    let f = fixture(DownloadConfig {
        max_concurrent: 2,
        ..Default::default()
    });
    let fetches = bodies.iter().enumerate().map(|(i, b)| {
        let d = f.downloader.clone();
        let url = server.url(&format!("m{i}"));
        let hash = sha(b);
        async move { d.fetch(&url, &hash, &no_progress).await }
    });
    for r in futures_util::future::join_all(fetches).await {
        r.unwrap();
    }
    assert_eq!(server.max_active.load(Ordering::SeqCst), 2);
    assert_eq!(server.seen().len(), 6);
}

#[tokio::test]
async fn the_same_content_under_two_ids_is_fetched_once() {
    let server = Server::start().await;
    server.behaviour.lock().unwrap().slow = Some(Duration::from_millis(1));
    let body = content(20_000, 20);
    server.put("m", body.clone(), "\"v\"");
    let f = fixture(DownloadConfig::default());
    let hash = sha(&body);
    let url = server.url("m");
    let (a, b) = tokio::join!(
        f.downloader.fetch(&url, &hash, &no_progress),
        f.downloader.fetch(&url, &hash, &no_progress)
    );
    assert_eq!(a.unwrap(), b.unwrap());
    assert_eq!(server.seen().len(), 1);
}

/// A module file `m.bin` holding `module` in a directory file:// URLs may name, and a fixture
/// that allows it.
fn allowed_module_file() -> (tempfile::TempDir, std::path::PathBuf, Fixture) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m.bin");
    std::fs::write(&src, b"module").unwrap();
    let f = fixture(DownloadConfig {
        file_url_dirs: vec![dir.path().to_owned()],
        ..Default::default()
    });
    (dir, src, f)
}

#[tokio::test]
async fn file_urls_are_copied_and_wrong_hashes_leave_nothing() {
    let (_dir, src, f) = allowed_module_file();
    let url = format!("file://{}", src.display());
    let e = f
        .downloader
        .fetch(&url, &sha(b"other"), &no_progress)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "Module hash mismatch");
    assert!(cache_files(&f.cache_dir).is_empty());
    // A hash of the wrong length is a mismatch too, as in EVP.
    let e = f.downloader.fetch(&url, "abcd", &no_progress).await;
    assert!(matches!(e, Err(FetchError::HashMismatch)));
    let path = f
        .downloader
        .fetch(&url, &sha(b"module").to_uppercase(), &no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"module");
    assert_eq!(path, f.downloader.cache().path_of(&sha(b"module")));
    let e = f
        .downloader
        .fetch("ftp://x/y", &sha(b"module2"), &no_progress)
        .await;
    assert!(matches!(e, Err(FetchError::UnsupportedScheme(_))));
}

#[tokio::test]
async fn file_urls_outside_the_allowed_directories_are_refused_and_copy_nothing() {
    let allowed = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"secret").unwrap();
    std::os::unix::fs::symlink(&secret, allowed.path().join("link")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", allowed.path().join("zero")).unwrap();
    let f = fixture(DownloadConfig {
        file_url_dirs: vec![allowed.path().to_owned()],
        ..Default::default()
    });
    let at = |p: &std::path::Path| format!("file://{}", p.display());
    let cases = [
        (at(&secret), "may only come from [reconciler] file_url_dirs"),
        (
            format!("file://{}/../{}", allowed.path().display(), "x"),
            "without '.' or '..'",
        ),
        (at(&allowed.path().join("link")), "outside [reconciler]"),
        (at(&allowed.path().join("zero")), "outside [reconciler]"),
        (at(allowed.path()), "not a regular file"),
    ];
    for (url, why) in cases {
        let e = f
            .downloader
            .fetch(&url, &sha(b"secret"), &no_progress)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(why), "{url}: {e}");
        assert!(!e.is_retryable(), "{url}: {e}");
    }
    assert!(cache_files(&f.cache_dir).is_empty());
    // The default allows no file:// URL at all.
    let none = fixture(DownloadConfig::default());
    let e = none
        .downloader
        .fetch(&at(&secret), &sha(b"secret"), &no_progress)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("none configured"), "{e}");
}

fn downloads(f: &Fixture) -> (Downloads, mpsc::UnboundedReceiver<DownloadEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sink: EventSink = Arc::new(move |ev| {
        let _ = tx.send(ev);
    });
    let config = DownloadConfig {
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(40),
        ..Default::default()
    };
    (Downloads::new(f.downloader.clone(), &config, sink), rx)
}

#[tokio::test]
async fn a_corrected_url_replaces_a_download_that_failed_for_good() {
    let (_dir, src, f) = allowed_module_file();
    let (mut d, mut rx) = downloads(&f);
    let hash = sha(b"module");
    d.ensure(&hash, "file:///etc/shadow");
    wait_event(&mut rx, "the refusal", |e| {
        matches!(e, DownloadEvent::Failed { retry_in: None, .. })
    })
    .await;
    // The same URL again changes nothing; the corrected one is fetched.
    d.ensure(&hash, "file:///etc/shadow");
    d.ensure(&hash, &format!("file://{}", src.display()));
    wait_event(&mut rx, "the download", |e| {
        matches!(e, DownloadEvent::Done { .. })
    })
    .await;
    assert!(f.downloader.cache().path_of(&hash).exists());
}

/// Waits for the first event that `pick` accepts, failing after the deadline.
async fn wait_event(
    rx: &mut mpsc::UnboundedReceiver<DownloadEvent>,
    what: &str,
    pick: impl Fn(&DownloadEvent) -> bool,
) -> Vec<DownloadEvent> {
    let mut before = Vec::new();
    let found = tokio::time::timeout(DEADLINE, async {
        while let Some(ev) = rx.recv().await {
            let done = pick(&ev);
            before.push(ev);
            if done {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "no {what} within {DEADLINE:?}: {before:?}");
    before
}

#[tokio::test]
async fn failed_downloads_are_retried_until_they_succeed() {
    let server = Server::start().await;
    let body = content(10_000, 30);
    server.put("m", body.clone(), "\"v\"");
    {
        let mut b = server.behaviour.lock().unwrap();
        b.fail = 2;
        b.cut = vec![0, 0, 4_000];
    }
    let f = fixture(DownloadConfig::default());
    let (mut d, mut rx) = downloads(&f);
    let hash = sha(&body);
    d.ensure(&hash, &server.url("m"));
    let events = wait_event(&mut rx, "Done", |e| matches!(e, DownloadEvent::Done { .. })).await;
    let failures: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            DownloadEvent::Failed { message, .. } => Some(message.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        failures[..2],
        [
            "Download failed HTTP Response = 500",
            "Download failed HTTP Response = 500"
        ]
    );
    assert_eq!(failures.len(), 3, "{failures:?}");
    assert!(f.downloader.cache().contains(&hash));
    let seen = server.seen();
    assert_eq!(seen.last().unwrap().range.as_deref(), Some("bytes=4000-"));
}

#[tokio::test]
async fn preemption_cancels_only_the_downloads_no_longer_wanted() {
    let server = Server::start().await;
    server.behaviour.lock().unwrap().slow = Some(Duration::from_millis(5));
    let kept = content(200_000, 40);
    let dropped = content(200_000, 41);
    server.put("kept", kept.clone(), "\"k\"");
    server.put("dropped", dropped.clone(), "\"d\"");
    let f = fixture(DownloadConfig::default());
    let (mut d, mut rx) = downloads(&f);
    let (kh, dh) = (sha(&kept), sha(&dropped));
    d.ensure(&kh, &server.url("kept"));
    d.ensure(&dh, &server.url("dropped"));
    // Both transfers are under way.
    wait_event(&mut rx, "progress of the dropped module", |e| {
        matches!(e, DownloadEvent::Progress { hash, progress, .. } if *hash == dh && progress.done > 0)
    })
    .await;
    // A newer deployment wants only `kept`; ensuring it again changes nothing.
    let cancelled = d.retain(|h| h == kh);
    d.ensure(&kh, &server.url("kept"));
    assert_eq!(cancelled, vec![dh.clone()]);
    assert!(!d.contains(&dh));
    let events = wait_event(
        &mut rx,
        "Done of the kept module",
        |e| matches!(e, DownloadEvent::Done { hash, .. } if *hash == kh),
    )
    .await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, DownloadEvent::Done { hash, .. } if *hash == dh)),
        "the cancelled download finished"
    );
    assert!(f.downloader.cache().contains(&kh));
    assert!(!f.downloader.cache().contains(&dh));
    let kept_requests = server.seen().iter().filter(|s| s.path == "kept").count();
    assert_eq!(kept_requests, 1, "the wanted download was restarted");
    // What the cancelled transfer got stays, to resume if the module comes back.
    let partial = std::fs::metadata(f.downloader.cache().partial_of(&dh)).unwrap();
    assert!(partial.len() > 0 && partial.len() < 200_000);
}
