//! A process's host memory from `/proc`: the totals of `smaps_rollup`, and the parts of them
//! that are WASM linear memory and instance thread stacks, told apart in `smaps` by their
//! shapes.
//!
//! wasmtime reserves each linear memory (or, with the pooling allocator, each slot of one pool)
//! as inaccessible address space: a guard of at least 32 MiB below it (none between pool
//! slots, whose neighbour's reservation is below instead) and the rest of its 4 GiB
//! reservation plus a guard above it. The pages the memory has are made accessible, or mapped
//! from the module's memory image, in between. So linear memory is a run of contiguous
//! accessible mappings with a large inaccessible one directly below and a huge one directly
//! above. Nothing else in the daemon looks so: a thread stack has a one-page guard, a malloc
//! arena at most 64 MiB of reserve, and wasmtime's table pool is larger than any memory may be.

use anyhow::{Context, Result};

/// Resident and proportional set sizes, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    /// Resident set size.
    pub rss_kib: u64,
    /// Proportional set size (shared pages divided among their sharers).
    pub pss_kib: u64,
}

impl Footprint {
    fn add(&mut self, other: Footprint) {
        self.rss_kib += other.rss_kib;
        self.pss_kib += other.pss_kib;
    }
}

/// One mapping of `/proc/<pid>/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    /// No access at all (`---p`): a reservation or a guard.
    inaccessible: bool,
    footprint: Footprint,
}

impl Mapping {
    fn bytes(&self) -> u64 {
        self.end - self.start
    }
}

/// A page, and a thread stack's guard.
const PAGE: u64 = 4096;
/// The inaccessible mapping below a linear memory is at least this large (wasmtime's guard
/// before a memory or a pool is 32 MiB; a thread stack's guard is a page).
const GUARD_BELOW: u64 = 16 << 20;
/// The inaccessible mapping above a linear memory is at least this large (the rest of its
/// 4 GiB reservation; a malloc arena reserves at most 64 MiB).
const RESERVATION_ABOVE: u64 = 1 << 30;

/// The `Rss:` and `Pss:` totals of a `smaps_rollup` text.
pub fn parse_rollup(text: &str) -> Result<Footprint> {
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in smaps_rollup"))
    };
    Ok(Footprint {
        rss_kib: field("Rss:")?,
        pss_kib: field("Pss:")?,
    })
}

/// The mappings of a `smaps` text, in address order.
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(first), Some(second)) = (words.next(), words.next()) else {
            continue;
        };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            mappings.push(Mapping {
                start,
                end,
                inaccessible: second.starts_with("---"),
                footprint: Footprint::default(),
            });
            continue;
        }
        let kib = || second.parse::<u64>().unwrap_or(0);
        if let Some(m) = mappings.last_mut() {
            match first {
                "Rss:" => m.footprint.rss_kib = kib(),
                "Pss:" => m.footprint.pss_kib = kib(),
                _ => {}
            }
        }
    }
    mappings.sort_by_key(|m| m.start);
    mappings
}

/// The linear memory resident in `mappings`: every run of contiguous accessible mappings, at
/// most `max_memory_bytes` long, between a guard of [`GUARD_BELOW`] and a reservation of
/// [`RESERVATION_ABOVE`], both contiguous with it.
fn linear_memory(mappings: &[Mapping], max_memory_bytes: u64) -> Footprint {
    let mut total = Footprint::default();
    let mut i = 0;
    while i < mappings.len() {
        if mappings[i].inaccessible {
            i += 1;
            continue;
        }
        // The run of contiguous accessible mappings starting at i ends before j.
        let mut j = i + 1;
        while j < mappings.len()
            && !mappings[j].inaccessible
            && mappings[j].start == mappings[j - 1].end
        {
            j += 1;
        }
        let run = &mappings[i..j];
        let guarded_below = i
            .checked_sub(1)
            .map(|b| &mappings[b])
            .is_some_and(|b| b.inaccessible && b.end == run[0].start && b.bytes() >= GUARD_BELOW);
        let reserved_above = mappings.get(j).is_some_and(|a| {
            a.inaccessible && a.start == run[run.len() - 1].end && a.bytes() >= RESERVATION_ABOVE
        });
        if guarded_below
            && reserved_above
            && run[run.len() - 1].end - run[0].start <= max_memory_bytes
        {
            run.iter().for_each(|m| total.add(m.footprint));
        }
        i = j;
    }
    total
}

/// The thread stacks of `stack_bytes` resident in `mappings`: accessible mappings of that
/// size directly above a one-page guard, as glibc lays out a thread stack of a given size.
fn thread_stacks(mappings: &[Mapping], stack_bytes: u64) -> Footprint {
    let mut total = Footprint::default();
    for pair in mappings.windows(2) {
        let (guard, stack) = (&pair[0], &pair[1]);
        if guard.inaccessible
            && guard.bytes() == PAGE
            && guard.end == stack.start
            && !stack.inaccessible
            && stack.bytes() == stack_bytes
        {
            total.add(stack.footprint);
        }
    }
    total
}

/// A sample of a process's memory.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sample {
    /// Everything (`smaps_rollup`).
    pub total: Footprint,
    /// Its WASM linear memory.
    pub linear: Footprint,
    /// The stacks of its instance threads.
    pub stacks: Footprint,
    /// Its threads.
    pub threads: u64,
}

/// Samples process `pid`, whose linear memories are at most `max_memory_bytes` each and whose
/// instance threads have stacks of `stack_bytes`.
pub fn sample(pid: u32, max_memory_bytes: u64, stack_bytes: u64) -> Result<Sample> {
    let read = |file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .with_context(|| format!("reading /proc/{pid}/{file}"))
    };
    let threads = read("status")?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mappings = parse_smaps(&read("smaps")?);
    Ok(Sample {
        total: parse_rollup(&read("smaps_rollup")?)?,
        linear: linear_memory(&mappings, max_memory_bytes),
        stacks: thread_stacks(&mappings, stack_bytes),
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;
    /// The `max_memory_bytes` of the cases: runtimed-wasm's default limit.
    const LIMIT: u64 = 64 * M;

    /// smaps text for mappings laid out from 0x7f0000000000 up: `(bytes, perms, rss KiB)`,
    /// a `None` leaving a 1 MiB hole; PSS is half the RSS.
    fn smaps(layout: &[Option<(u64, &str, u64)>]) -> String {
        let mut at = 0x7f00_0000_0000u64;
        let mut text = String::new();
        for mapping in layout {
            let Some((bytes, perms, rss)) = mapping else {
                at += M;
                continue;
            };
            text += &format!(
                "{at:x}-{:x} {perms} 00000000 00:00 0 \nSize: {} kB\nRss: {rss} kB\nPss: {} kB\n\
                 VmFlags: rd wr mr mw me ac\n",
                at + bytes,
                bytes / K,
                rss / 2
            );
            at += bytes;
        }
        text
    }

    fn check(layout: &[Option<(u64, &str, u64)>], expect_rss_kib: u64) {
        let got = linear_memory(&parse_smaps(&smaps(layout)), LIMIT);
        assert_eq!(
            got,
            Footprint {
                rss_kib: expect_rss_kib,
                pss_kib: expect_rss_kib / 2
            },
            "{layout:?}"
        );
    }

    #[test]
    fn linear_memory_is_told_apart_by_its_guards() {
        let guard = Some((32 * M, "---p", 0));
        let rest = Some((4 * G, "---p", 0));
        // On-demand: a guard, the accessible pages, the rest of the reservation.
        check(&[guard, Some((128 * K, "rw-p", 32)), rest], 32);
        // The memory image mapped in front of anonymous pages: one memory.
        check(
            &[
                guard,
                Some((8 * K, "rw-p", 8)),
                Some((120 * K, "rw-p", 4)),
                rest,
            ],
            12,
        );
        // A pool of slots: each after the reservation of the one below.
        check(
            &[
                guard,
                Some((64 * K, "rw-p", 8)),
                rest,
                Some((128 * K, "rw-p", 12)),
                rest,
            ],
            20,
        );
        // A thread stack under a pool has a one-page guard.
        check(&[Some((4 * K, "---p", 0)), Some((M, "rw-p", 16)), rest], 0);
        // malloc arenas reserve at most 64 MiB each.
        let arena = [
            Some((132 * K, "rw-p", 100)),
            Some((64 * M - 132 * K, "---p", 0)),
        ];
        check(&[arena[0], arena[1], arena[0], arena[1]], 0);
        // The table pool is larger than any memory may be.
        check(&[guard, Some((640 * M, "rw-p", 40)), rest], 0);
        // Not contiguous with its guard or its reservation.
        check(&[guard, None, Some((128 * K, "rw-p", 32)), rest], 0);
        check(&[guard, Some((128 * K, "rw-p", 32)), None, rest], 0);
        // At the ends of the address space.
        check(&[Some((128 * K, "rw-p", 32)), rest], 0);
        check(&[guard, Some((128 * K, "rw-p", 32))], 0);
        check(&[], 0);
    }

    #[test]
    fn thread_stacks_are_their_size_above_a_page_of_guard() {
        fn check(layout: &[Option<(u64, &str, u64)>], expect_rss_kib: u64) {
            let got = thread_stacks(&parse_smaps(&smaps(layout)), M);
            assert_eq!(got.rss_kib, expect_rss_kib, "{layout:?}");
        }
        let guard = Some((4 * K, "---p", 0));
        check(
            &[guard, Some((M, "rw-p", 24)), guard, Some((M, "rw-p", 16))],
            40,
        );
        // Other sizes are other threads' (tokio's are 2 MiB).
        check(&[guard, Some((2 * M, "rw-p", 24))], 0);
        check(&[Some((8 * K, "---p", 0)), Some((M, "rw-p", 24))], 0);
        check(&[guard, None, Some((M, "rw-p", 24))], 0);
        check(&[Some((M, "rw-p", 24))], 0);
    }

    #[test]
    fn the_rollup_gives_rss_and_pss() {
        let text = "55d0c8a00000-7ffd1e9f3000 ---p 00000000 00:00 0 [rollup]\n\
                    Rss:               12345 kB\nPss:                6789 kB\n\
                    Pss_Anon:           5000 kB\n";
        assert_eq!(
            parse_rollup(text).unwrap(),
            Footprint {
                rss_kib: 12345,
                pss_kib: 6789
            }
        );
        assert!(parse_rollup("Rss: 1 kB\n").is_err());
    }
}
