//! The download tasks, one per module hash, owned by the reconcile loop: each fetches with
//! [`Downloader`], reports to the loop's sink, and retries with backoff until it succeeds or the
//! module is no longer wanted (then it is aborted; what it received stays to resume).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use evp_daemon::Backoff;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{DownloadConfig, Downloader, Progress};
use crate::store::ModuleCache;

/// What a download task reports to the reconcile loop. `task` tells a task apart from an
/// earlier, cancelled one for the same hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadEvent {
    /// An attempt started.
    Started {
        /// The module file's hash.
        hash: String,
        /// The task's number.
        task: u64,
    },
    /// Bytes arrived.
    Progress {
        /// The module file's hash.
        hash: String,
        /// The task's number.
        task: u64,
        /// How far.
        progress: Progress,
    },
    /// An attempt failed; the task retries after `retry_in`, or never when `None`.
    Failed {
        /// The module file's hash.
        hash: String,
        /// The task's number.
        task: u64,
        /// The failure message for the module's status.
        message: String,
        /// When the next attempt comes.
        retry_in: Option<Duration>,
    },
    /// The file is in the cache; the task ended.
    Done {
        /// The module file's hash.
        hash: String,
        /// The task's number.
        task: u64,
    },
}

/// Where download tasks send their events.
pub type EventSink = Arc<dyn Fn(DownloadEvent) + Send + Sync>;

struct Task {
    id: u64,
    url: String,
    handle: JoinHandle<()>,
}

/// The running download tasks, one per module hash; owned by the reconcile loop.
pub struct Downloads {
    downloader: Downloader,
    sink: EventSink,
    retry_base: Duration,
    retry_max: Duration,
    tasks: HashMap<String, Task>,
    next_id: u64,
}

impl Downloads {
    /// No tasks yet; they will report to `sink`.
    pub fn new(downloader: Downloader, config: &DownloadConfig, sink: EventSink) -> Self {
        Downloads {
            downloader,
            sink,
            retry_base: config.retry_base,
            retry_max: config.retry_max,
            tasks: HashMap::new(),
            next_id: 0,
        }
    }

    /// The cache the tasks fill.
    pub fn cache(&self) -> &ModuleCache {
        self.downloader.cache()
    }

    /// Makes sure a task fetches `hash` from `url`; an existing one from the same URL carries
    /// on untouched. One from another URL is replaced, so a URL the hub corrected is used even
    /// after the old one failed for good (a refused `file://` path, an unsupported scheme).
    pub fn ensure(&mut self, hash: &str, url: &str) {
        if let Some(task) = self.tasks.get(hash) {
            if task.url == url {
                return;
            }
            task.handle.abort();
            info!(old = %task.url, url, sha256 = %hash, "module URL changed: fetching from the new one");
        }
        self.next_id += 1;
        let id = self.next_id;
        let downloader = self.downloader.clone();
        let sink = self.sink.clone();
        let mut backoff = Backoff::new(self.retry_base, self.retry_max);
        let (h, u) = (hash.to_owned(), url.to_owned());
        let handle = tokio::spawn(async move {
            loop {
                sink(DownloadEvent::Started {
                    hash: h.clone(),
                    task: id,
                });
                let report = |progress| {
                    sink(DownloadEvent::Progress {
                        hash: h.clone(),
                        task: id,
                        progress,
                    })
                };
                match downloader.fetch(&u, &h, &report).await {
                    Ok(_) => {
                        sink(DownloadEvent::Done { hash: h, task: id });
                        return;
                    }
                    Err(e) => {
                        let retry_in = e.is_retryable().then(|| backoff.next_delay());
                        warn!(url = %u, retry_in = ?retry_in, "module download failed: {e}");
                        sink(DownloadEvent::Failed {
                            hash: h.clone(),
                            task: id,
                            message: e.to_string(),
                            retry_in,
                        });
                        match retry_in {
                            Some(d) => tokio::time::sleep(d).await,
                            None => return,
                        }
                    }
                }
            }
        });
        self.tasks.insert(
            hash.to_owned(),
            Task {
                id,
                url: url.to_owned(),
                handle,
            },
        );
    }

    /// Whether `task` is the current task for `hash` (events of cancelled tasks are stale).
    pub fn is_current(&self, hash: &str, task: u64) -> bool {
        self.tasks.get(hash).is_some_and(|t| t.id == task)
    }

    /// Whether a task for `hash` exists (running or waiting to retry).
    pub fn contains(&self, hash: &str) -> bool {
        self.tasks.contains_key(hash)
    }

    /// The hashes that have a task, with the URL each fetches from.
    pub fn urls(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tasks.iter().map(|(h, t)| (h.as_str(), t.url.as_str()))
    }

    /// Forgets the task of `hash` after it reported `Done`.
    pub fn finished(&mut self, hash: &str) {
        self.tasks.remove(hash);
    }

    /// Cancels every task whose hash `wanted` refuses; returns their hashes. What a cancelled
    /// transfer received stays in its partial file, to resume if the module comes back.
    pub fn retain(&mut self, wanted: impl Fn(&str) -> bool) -> Vec<String> {
        let unwanted: Vec<String> = self.tasks.keys().filter(|h| !wanted(h)).cloned().collect();
        for hash in &unwanted {
            if let Some(task) = self.tasks.remove(hash) {
                task.handle.abort();
                info!(url = %task.url, sha256 = %hash, "module download cancelled: no longer in the deployment");
            }
        }
        unwanted
    }
}

impl Drop for Downloads {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.handle.abort();
        }
    }
}
