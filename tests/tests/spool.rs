//! Nothing lost offline: hubd's spool over the real processes. The device reaches mosquitto
//! through a relay the test cuts (connections reset and refused: the broker is down, as the
//! device sees it) while the hub driver stays connected to mosquitto and sees everything the
//! device sends. `evp-test-ticker` instances send numbered telemetry at a steady rate.

use std::time::{Duration, Instant};

use evp_system_tests::system::{
    Options, System, deploy_and_wait, deployment_of, hub1, wait_connection,
};
use evp_system_tests::telemetry::{Received, TELEMETRY_TOPIC, first_arrivals, tick};
use evp_system_tests::{DEADLINE, wait_for};
use serde_json::Value;

const HUBD: &str = "evp-hubd";

async fn start(extra_toml: &str, instances: &[&str]) -> System {
    let sys = System::start_with(Options {
        relay: true,
        extra_toml: extra_toml.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let specs: Vec<(&str, &str)> = instances.iter().map(|i| (*i, "evp-test-ticker")).collect();
    deploy_and_wait(&sys, &deployment_of("dep-tick", &specs)).await;
    sys
}

/// Waits for the ticker's line saying every callback of its run came back.
async fn wait_ticked(sys: &System, instance: &str, count: u64, timeout: Duration) -> String {
    let log = sys.instance_dir(instance).join("logs/stderr.log");
    let want = format!("ticker: all {count} done");
    wait_for(
        &format!("{instance} to finish ticking"),
        timeout,
        async || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.lines().find(|l| l.contains(&want)).map(str::to_owned)
        },
    )
    .await
    .unwrap()
}

/// Bytes the spool holds for `seq` values of `instance` (its record layout: an 8-byte header,
/// the seq, two name lengths, the names and the payload).
fn record_bytes(instance: &str, seqs: impl Iterator<Item = u64>) -> u64 {
    seqs.map(|n| {
        let payload = format!("{{\"{instance}/seq\":{n}}}");
        (8 + 8 + 2 + 2 + instance.len() + TELEMETRY_TOPIC.len() + payload.len()) as u64
    })
    .sum()
}

fn status_losses(sys: &System) -> Option<Value> {
    sys.hub
        .latest_status()
        .and_then(|s| s.get("state/$agent/telemetry-dropped").cloned())
}

#[tokio::test(flavor = "multi_thread")]
async fn telemetry_sent_while_the_broker_is_away_a_minute_all_arrives_in_order() {
    const COUNT: u64 = 3500;
    let sys = start("", &["t1", "t2"]).await;
    let received = Received::follow(&sys).await;
    let hub = hub1(&sys).await;
    for t in ["t1", "t2"] {
        tick(&sys, t, COUNT, 20).await;
    }
    for t in ["t1", "t2"] {
        received.wait_distinct(t, 50, DEADLINE).await;
    }

    let relay = sys.relay.as_ref().unwrap();
    relay.down();
    wait_connection(&hub, false, DEADLINE).await;
    wait_for("telemetry to be spooled", DEADLINE, async || {
        (hub.queued_bytes().await.ok()? > 0).then_some(())
    })
    .await
    .unwrap();
    // The outage itself: a minute of a broker away while the modules go on.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let queued = hub.queued_bytes().await.unwrap();
    let up = Instant::now();
    relay.up().await.unwrap();
    // A host that refuses connections is retried within 8 s (jittered), not 64.
    wait_connection(&hub, true, Duration::from_secs(10)).await;
    eprintln!(
        "{queued} bytes queued after the outage; reconnected {:?} after the broker was back",
        up.elapsed()
    );

    for t in ["t1", "t2"] {
        received
            .wait_distinct(t, COUNT as usize, Duration::from_secs(90))
            .await;
        let order = first_arrivals(&received.of(t));
        assert!(
            order.iter().copied().eq(0..COUNT),
            "{t}: values out of order or missing: {:?}…",
            &order[..order.len().min(20)]
        );
        wait_ticked(&sys, t, COUNT, DEADLINE).await;
    }
    wait_for("the spool to drain", DEADLINE, async || {
        (hub.queued_bytes().await.ok()? == 0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(status_losses(&sys), None, "nothing was dropped");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn what_hubd_spooled_offline_and_the_latest_state_survive_a_kill_9() {
    const COUNT: u64 = 400;
    let sys = start("", &["t1"]).await;
    let received = Received::follow(&sys).await;
    let hub = hub1(&sys).await;
    let relay = sys.relay.as_ref().unwrap();
    relay.down();
    wait_connection(&hub, false, DEADLINE).await;
    tick(&sys, "t1", COUNT, 5).await;
    wait_ticked(&sys, "t1", COUNT, DEADLINE).await;
    // Everything is in hubd once the spool holds all of it (the size of each record is known).
    let all = record_bytes("t1", 0..COUNT);
    wait_for("hubd to spool all of it", DEADLINE, async || {
        (hub.queued_bytes().await.ok()? == all).then_some(())
    })
    .await
    .unwrap();

    // The module's last state, reported offline, is kept too (only the latest matters).
    let ticks = format!("{{\"sent\":{COUNT},\"errors\":0}}");
    let states = sys.data_dir().join("hub/spool/states.json");
    wait_for(
        "hubd to keep the last state on disk",
        DEADLINE,
        async || {
            let entries: Vec<(String, String, Vec<u8>)> =
                serde_json::from_slice(&std::fs::read(&states).ok()?).ok()?;
            entries
                .iter()
                .any(|(i, t, v)| i == "t1" && t == "ticks" && v == ticks.as_bytes())
                .then_some(())
        },
    )
    .await
    .unwrap();

    sys.kill_and_start(HUBD).await.unwrap();
    wait_for("hubd back with its spool", DEADLINE, async || {
        (hub.queued_bytes().await.ok()? == all).then_some(())
    })
    .await
    .unwrap();
    relay.up().await.unwrap();
    received.wait_distinct("t1", COUNT as usize, DEADLINE).await;
    assert!(first_arrivals(&received.of("t1")).into_iter().eq(0..COUNT));
    evp_system_tests::system::wait_state(&sys, "state/t1/ticks", |v| v == ticks.as_str()).await;
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_spool_drops_the_oldest_telemetry_counts_it_and_the_status_still_goes() {
    const COUNT: u64 = 8000;
    // 256 KiB holds about 4,300 of these records: about half must go.
    let sys = start(
        "[hub]\nspool_max_bytes = 262144\nspool_instance_max_bytes = 262144\n",
        &["t1"],
    )
    .await;
    let received = Received::follow(&sys).await;
    let hub = hub1(&sys).await;
    let relay = sys.relay.as_ref().unwrap();
    relay.down();
    wait_connection(&hub, false, DEADLINE).await;
    let before = sys.hub.status_count();
    tick(&sys, "t1", COUNT, 1).await;
    wait_ticked(&sys, "t1", COUNT, Duration::from_secs(60)).await;
    let queued = hub.queued_bytes().await.unwrap();
    assert!(
        queued <= 262_144,
        "the spool holds {queued} bytes, over its bound"
    );
    relay.up().await.unwrap();

    // The status report comes first, with the count of what was lost.
    let dropped = wait_for(
        "the status report counting the loss",
        DEADLINE,
        async || {
            (sys.hub.status_count() > before)
                .then(|| status_losses(&sys))
                .flatten()
        },
    )
    .await
    .unwrap();
    let dropped = dropped["t1"].as_u64().expect("a count for t1");
    received
        .wait_distinct("t1", (COUNT - dropped) as usize, DEADLINE)
        .await;
    let order = first_arrivals(&received.of("t1"));
    assert!(dropped > 1000, "{dropped} dropped");
    // The oldest went: what arrived is the newest, in order, ending with the last value.
    assert!(order.windows(2).all(|w| w[0] < w[1]), "out of order");
    assert_eq!(order.last(), Some(&(COUNT - 1)));
    assert_eq!(
        order.len() as u64 + dropped,
        COUNT,
        "every value arrived or was counted"
    );
    sys.stop().await;
}

/// hubd aborted right after `point` (its `EVP_TEST_CRASH_AT` hook), as by a power cut there:
/// it starts again on what the spool holds, and the hub gets the ticker's values in order.
/// Offline points are reached with the relay cut.
async fn crash_at(point: &str, offline: bool) {
    const COUNT: u64 = 1000;
    // Small segments (16 KiB), so that one fills and goes within the run.
    let sys = start("[hub]\nspool_max_bytes = 262144\n", &["t1"]).await;
    let received = Received::follow(&sys).await;
    let hub = hub1(&sys).await;
    let exits = sys.arm_crash_at(HUBD, point).await.unwrap();
    wait_connection(&hub, true, DEADLINE).await;
    let relay = sys.relay.as_ref().unwrap();
    if offline {
        relay.down();
        wait_connection(&hub, false, DEADLINE).await;
    }
    tick(&sys, "t1", COUNT, 10).await;
    sys.wait_crashed_at(HUBD, point, exits).await.unwrap();

    // Power back: hubd reads its spool and sends what it holds.
    sys.start_disarmed(HUBD).await.unwrap();
    if offline {
        relay.up().await.unwrap();
    }
    wait_ticked(&sys, "t1", COUNT, Duration::from_secs(60)).await;
    wait_for("the spool to drain", DEADLINE, async || {
        (hub.queued_bytes().await.ok()? == 0).then_some(())
    })
    .await
    .unwrap();
    let order = first_arrivals(&received.of("t1"));
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "{point}: out of order"
    );
    assert_eq!(order.last(), Some(&(COUNT - 1)), "{point}");
    // Nothing is missing: what hubd had spooled survives, and what it had not read yet when it
    // died sdk-broker sends again to the new hubd (duplicates allowed, losses not).
    let missing: Vec<u64> = (0..COUNT).filter(|n| !order.contains(n)).collect();
    assert!(missing.is_empty(), "{point}: lost {missing:?}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_power_cut_after_a_spool_append_loses_nothing_spooled() {
    crash_at("spool-appended", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_power_cut_after_a_spool_sync_loses_nothing_spooled() {
    crash_at("spool-synced", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_power_cut_after_a_segment_is_removed_loses_nothing_spooled() {
    crash_at("spool-segment-removed", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_power_cut_after_the_cursor_is_written_loses_nothing_spooled() {
    crash_at("spool-cursor-written", false).await;
}
