//! CPU time spent by processes and their threads, from `/proc/<pid>/task/*/schedstat` (whose
//! first field is the nanoseconds a thread ran), to tell what a scenario's time goes to on a
//! machine whose two cores other processes share too.

use std::collections::BTreeMap;

/// Nanoseconds on CPU by `"<process>/<thread name>"`, threads of one name summed.
pub type CpuTimes = BTreeMap<String, u64>;

/// The first field of a `schedstat` text: nanoseconds on CPU.
fn run_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// The CPU time of every thread of each `(label, pid)` that is still there.
pub fn snapshot(processes: &[(&str, u32)]) -> CpuTimes {
    let mut times = CpuTimes::new();
    for (label, pid) in processes {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.filter_map(|t| t.ok()) {
            let dir = task.path();
            let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let ns = std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| run_ns(&s))
                .unwrap_or(0);
            *times.entry(format!("{label}/{}", name.trim())).or_default() += ns;
        }
    }
    times
}

/// What each thread (and, under `"<process>"`, each process) ran between `before` and
/// `after`, added to `total`. Threads that ended meanwhile are not counted.
pub fn add_difference(total: &mut CpuTimes, before: &CpuTimes, after: &CpuTimes) {
    for (thread, ns) in after {
        let ran = ns.saturating_sub(before.get(thread).copied().unwrap_or(0));
        *total.entry(thread.clone()).or_default() += ran;
        let process = thread.split('/').next().unwrap_or(thread);
        *total.entry(process.to_owned()).or_default() += ran;
    }
}

/// The PID of the first process whose command line holds `needle`.
pub fn pid_with_argument(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == needle.as_bytes()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_difference_is_by_thread_and_by_process() {
        let times = |pairs: &[(&str, u64)]| -> CpuTimes {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
        };
        let before = times(&[("hubd/tokio", 100), ("broker/sdk-a", 50)]);
        let after = times(&[
            ("hubd/tokio", 300),
            ("broker/sdk-a", 80),
            ("broker/sdk-b", 5),
        ]);
        let mut total = CpuTimes::new();
        add_difference(&mut total, &before, &after);
        let expect = times(&[
            ("hubd", 200),
            ("hubd/tokio", 200),
            ("broker", 35),
            ("broker/sdk-a", 30),
            ("broker/sdk-b", 5),
        ]);
        assert_eq!(total, expect);
    }

    #[test]
    fn schedstat_starts_with_the_run_time() {
        assert_eq!(run_ns("123456789 2000 42\n"), Some(123_456_789));
        assert_eq!(run_ns(""), None);
    }
}
