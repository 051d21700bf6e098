//! Transport tests over real sockets.

use super::*;
use raft::eraftpb::Message;
use roamdisk_core::ids::GroupId;
use tokio::net::TcpListener;

use crate::store::Outbox;

/// Appends to a capped remote link queue behind each other; a heartbeat sent after
/// them travels on the control lane and arrives first, and the cap holds the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_overtakes_bulk_on_a_capped_link() {
    use raft::eraftpb::{Entry, MessageType};
    const CAP: u64 = 2 << 20;
    let shutdown = CancellationToken::new();
    let rt = tokio::runtime::Handle::current();
    let (a_tx, _a_rx) = flume::bounded(1024);
    let (b_tx, b_rx) = flume::bounded(1024);
    let caps = HashMap::from([("far".to_string(), CAP)]);
    let a = Transport::new(
        NodeId(1),
        "near".into(),
        caps,
        a_tx,
        rt.clone(),
        shutdown.clone(),
    );
    let b = Transport::new(
        NodeId(2),
        "far".into(),
        HashMap::new(),
        b_tx,
        rt,
        shutdown.clone(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(Arc::clone(&b).serve(listener));
    a.set_peer(NodeId(2), "far", addr);
    let outbox = ArcOutbox(Arc::clone(&a));
    // Incompressible entries, so the cap sees every byte.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let appends = 8;
    for i in 0..appends {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.to = 2;
        m.index = i;
        let mut e = Entry::default();
        e.data = (0..(512 << 10))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
            .into();
        m.entries = vec![e].into();
        outbox.send(NodeId(2), GroupId(5), 0, m);
    }
    let start = std::time::Instant::now();
    let mut hb = Message::default();
    hb.set_msg_type(MessageType::MsgHeartbeat);
    hb.to = 2;
    outbox.send(NodeId(2), GroupId(5), 0, hb);
    let mut order = Vec::new();
    while order.len() < appends as usize + 1 {
        match b_rx.recv_async().await.unwrap() {
            Event::Raft { msg, .. } => order.push(msg.get_msg_type()),
            _ => {}
        }
    }
    let hb_at = order
        .iter()
        .position(|t| *t == MessageType::MsgHeartbeat)
        .unwrap();
    assert!(
        hb_at < appends as usize,
        "heartbeat waited behind appends: {order:?}"
    );
    // 4 MiB at 2 MiB/s with a burst of one batch (256 KiB): at least 1.8 s.
    let took = start.elapsed().as_secs_f64();
    assert!(took >= 1.4, "the cap let 4 MiB through in {took:.2} s");
    let links = a.links();
    assert_eq!(links.len(), 1);
    let log = links[0].lanes.iter().find(|l| l.lane == Lane::Log).unwrap();
    assert!(log.wire_bytes >= appends * (512 << 10), "{links:?}");
    assert!(links[0].paced_secs > 1.0, "{links:?}");
    shutdown.cancel();
}
