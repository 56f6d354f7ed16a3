//! sdk-broker's checks of a blob operation before a transfer, on text: the module's file name
//! (`blob::confine`, onto a path below the instance's workspace) and HTTP_EXT's `Name: value`
//! headers (`blob::parse_headers`), and a storage token's headers (`Job::set_token`). The
//! input is lines: the file name, then one header per line.
#![no_main]

use std::path::{Path, PathBuf};

use evp_schemas::sdk::BlobRequest;
use evp_sdk_broker::blob::{self, Direction, Job};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let filename = lines.next().unwrap_or_default();
    let headers: Vec<String> = lines.map(str::to_owned).collect();
    for workspace in [
        "/var/lib/evp/instances/inst-1/default_workspace",
        blob::CONTAINER_WORKSPACE,
    ] {
        let workspace = Path::new(workspace);
        if let Ok(file) = blob::confine(filename, workspace) {
            evp_fuzz::confined(&file, workspace);
        }
    }
    let request = BlobRequest::HttpExt {
        url: "http://h/x".into(),
        headers: headers.clone(),
    };
    for direction in [Direction::Get, Direction::Put] {
        match blob::parse_headers(&request, direction) {
            Ok(map) => assert_eq!(map.len(), headers.len(), "one header per line"),
            Err(e) => {
                let blob::Refused::BadHeader(h) = &e else {
                    panic!("{e:?}");
                };
                assert!(headers.contains(h), "{e:?}");
            }
        }
    }
    let azure = BlobRequest::AzureBlob {
        url: "https://a/b".into(),
    };
    assert_eq!(
        blob::parse_headers(&azure, Direction::Put).unwrap().len(),
        1
    );
    // The same headers from a storage token: taken whole or not at all.
    let mut job = Job {
        kind: 3,
        direction: Direction::Put,
        url: String::new(),
        headers: Default::default(),
        workspace: PathBuf::from("/w"),
        file: PathBuf::from("f"),
        storage: None,
    };
    let pairs: Vec<(String, String)> = headers
        .iter()
        .filter_map(|h| h.split_once(':'))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    let before = job.clone();
    match job.set_token("https://h/x".into(), pairs.clone()) {
        Ok(()) => assert_eq!(job.headers.len(), pairs.len()),
        Err(_) => assert_eq!(job, before, "a refused token leaves the job as it was"),
    }
});
