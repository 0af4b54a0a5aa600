//! `ivnet status --format prometheus`: a [`Status`] as metrics in the OpenMetrics text format
//! (written by the `prometheus-client` crate), for Prometheus or node_exporter's textfile
//! collector (`systemd/ivnet-metrics.timer` writes that file).
//!
//! Every series carries the region's name (`region`); peers are labelled by `peer` id, rings by
//! `src` and `dst`. Counters are the members' own (they restart from 0 when a member rejoins),
//! gauges are read at the moment of the status.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::region::PeerState;
use crate::status::Status;

type Labels = Vec<(String, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type FloatGauges = Family<Labels, Gauge<f64, AtomicU64>>;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// Encodes `status` (the region's, with the answering agent's when it came from one).
pub fn encode_status(status: &Status) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("ivnet");
    let region = status.region.clone();
    let r = || ("region", region.clone());

    let info = Gauges::default();
    reg.register(
        "region_info",
        "Layout version and geometry of the region (value 1)",
        info.clone(),
    );
    let g = &status.geometry;
    info.get_or_create(&labels(&[
        r(),
        ("version", status.version.to_string()),
        ("max_peers", g.max_peers.to_string()),
        ("ring_slots", g.ring_slots.to_string()),
        ("slot_size", g.slot_size.to_string()),
        ("segment_mtu", g.mtu.to_string()),
    ]))
    .set(1);

    let peer_up = Gauges::default();
    reg.register(
        "peer_up",
        "1 if the member's slot is up (joined, heartbeating), else 0",
        peer_up.clone(),
    );
    let peer_info = Gauges::default();
    reg.register(
        "peer_info",
        "A member's state, kind, MAC, MTU, offloads and IP addresses (value 1)",
        peer_info.clone(),
    );
    let hb_age = FloatGauges::default();
    reg.register(
        "peer_heartbeat_age_seconds",
        "Age of the member's last heartbeat by the wall clock",
        hb_age.clone(),
    );
    let incarnation = Gauges::default();
    reg.register("peer_incarnation", "Times the slot was claimed", incarnation.clone());
    let local_frames = Counters::default();
    reg.register(
        "peer_local_frames",
        "Frames between the member and its local interface (rx: read from it, tx: written to it)",
        local_frames.clone(),
    );
    let local_bytes = Counters::default();
    reg.register(
        "peer_local_bytes",
        "Bytes between the member and its local interface",
        local_bytes.clone(),
    );
    let flooded = Counters::default();
    reg.register(
        "peer_flooded_frames",
        "Frames flooded to every peer (broadcast, multicast, unknown unicast)",
        flooded.clone(),
    );
    let peer_drops = Counters::default();
    reg.register("peer_drops", "Frames the member dropped, by reason", peer_drops.clone());
    let doorbells = Counters::default();
    reg.register("peer_doorbells", "Doorbell events of the member, by event", doorbells.clone());

    for p in &status.peers {
        let id = || ("peer", p.id.to_string());
        let e = &p.entry;
        peer_up.get_or_create(&labels(&[r(), id()])).set(i64::from(e.state == PeerState::Up));
        peer_info
            .get_or_create(&labels(&[
                r(),
                id(),
                ("state", format!("{:?}", e.state).to_lowercase()),
                ("kind", format!("{:?}", e.kind).to_lowercase()),
                ("mac", crate::mac::Mac(e.mac).to_string()),
                ("mtu", e.mtu.to_string()),
                ("offloads", p.offloads.clone()),
                ("addresses", p.addresses.join(" ")),
            ]))
            .set(1);
        if let Some(ms) = p.heartbeat_age_ms {
            hb_age.get_or_create(&labels(&[r(), id()])).set(ms as f64 / 1000.0);
        }
        incarnation.get_or_create(&labels(&[r(), id()])).set(e.incarnation as i64);
        let c = &p.counters;
        for (dir, frames, bytes) in [
            ("rx", c.local_rx_frames, c.local_rx_bytes),
            ("tx", c.local_tx_frames, c.local_tx_bytes),
        ] {
            local_frames
                .get_or_create(&labels(&[r(), id(), ("direction", dir.into())]))
                .inc_by(frames);
            local_bytes
                .get_or_create(&labels(&[r(), id(), ("direction", dir.into())]))
                .inc_by(bytes);
        }
        flooded.get_or_create(&labels(&[r(), id()])).inc_by(c.flooded);
        for (reason, v) in [
            ("no_peer", c.drop_no_peer),
            ("to_self", c.drop_to_self),
            ("oversize", c.drop_oversize),
            ("runt", c.drop_runt),
            ("offload", c.drop_offload),
            ("kernel", c.local_kernel_drops),
            ("io_error", c.local_io_errors),
        ] {
            peer_drops.get_or_create(&labels(&[r(), id(), ("reason", reason.into())])).inc_by(v);
        }
        let d = &p.doorbells;
        for (event, v) in [
            ("rung", d.rung),
            ("suppressed", d.suppressed),
            ("wakeup", d.wakeups),
            ("spin_with_work", d.spins_with_work),
        ] {
            doorbells.get_or_create(&labels(&[r(), id(), ("event", event.into())])).inc_by(v);
        }
    }

    let ring_frames = Counters::default();
    reg.register(
        "ring_frames",
        "Frames through a ring (tx: published by src, rx: delivered by dst)",
        ring_frames.clone(),
    );
    let ring_bytes = Counters::default();
    reg.register("ring_bytes", "Bytes through a ring", ring_bytes.clone());
    let ring_drops = Counters::default();
    reg.register(
        "ring_drops",
        "Frames dropped on a ring, by reason (full, down, mtu: by src; the rest by dst)",
        ring_drops.clone(),
    );
    let ring_fill = Gauges::default();
    reg.register(
        "ring_fill_segments",
        "Segments in use in a ring (absent when head and tail are inconsistent)",
        ring_fill.clone(),
    );
    let ring_size = Gauges::default();
    reg.register("ring_segments", "Segments per ring", ring_size.clone());
    for ring in &status.rings {
        let x = &ring.ring;
        let sd = || vec![r(), ("src", ring.src.to_string()), ("dst", ring.dst.to_string())];
        let with = |k: &str, v: &str| {
            let mut l = sd();
            l.push((k, v.to_string()));
            labels(&l)
        };
        ring_frames.get_or_create(&with("direction", "tx")).inc_by(x.tx_frames);
        ring_frames.get_or_create(&with("direction", "rx")).inc_by(x.rx_frames);
        ring_bytes.get_or_create(&with("direction", "tx")).inc_by(x.tx_bytes);
        ring_bytes.get_or_create(&with("direction", "rx")).inc_by(x.rx_bytes);
        for (reason, v) in [
            ("full", x.tx_drop_full),
            ("down", x.tx_drop_down),
            ("mtu", x.tx_drop_mtu),
            ("stale", x.rx_drop_stale),
            ("corrupt", x.rx_corrupt),
            ("deliver", x.rx_drop_deliver),
            ("size", x.rx_drop_size),
            ("offload", x.rx_drop_offload),
            ("source", x.rx_drop_source),
        ] {
            ring_drops.get_or_create(&with("reason", reason)).inc_by(v);
        }
        if let Some(f) = x.fill {
            ring_fill.get_or_create(&labels(&sd())).set(f as i64);
        }
        ring_size.get_or_create(&labels(&sd())).set(x.slots as i64);
    }

    if let Some(a) = &status.agent {
        let tap = || ("tap", a.tap.clone());
        let agent_info = Gauges::default();
        reg.register(
            "agent_info",
            "The agent that answered: TAP, peer id, version, backend (value 1)",
            agent_info.clone(),
        );
        agent_info
            .get_or_create(&labels(&[
                r(),
                tap(),
                ("peer", a.peer_id.to_string()),
                ("version", a.version.clone()),
                ("backend", a.backend.clone()),
                ("addresses", a.addresses.join(" ")),
            ]))
            .set(1);
        let uptime = FloatGauges::default();
        reg.register("agent_uptime_seconds", "Seconds since the agent joined", uptime.clone());
        uptime.get_or_create(&labels(&[r(), tap()])).set(a.uptime_s);
        let up = Gauges::default();
        reg.register("agent_peers_up", "Peers whose link the agent sees up", up.clone());
        up.get_or_create(&labels(&[r(), tap()])).set(a.peers_up.len() as i64);
    }

    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}
