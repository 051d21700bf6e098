//! Helpers shared by the playground tests.

/// A `--base-port` for a playground of `nodes` nodes whose every port binds now: NBD
/// (base..), admin (base+100..), peers (base+200..), the WAN control API (base+300) and
/// WAN routes (base+400..). `first` separates tests that run at the same time. Ports stay
/// below the ephemeral range (32768..), where outgoing connections take theirs.
pub fn free_base_port(nodes: u16, first: u16) -> u16 {
    for base in (first..32000).step_by(997) {
        let ok = (0..nodes)
            .flat_map(|i| [i, 100 + i, 200 + i])
            .chain(300..301)
            .chain(400..400 + 2 * nodes)
            .all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no free port range");
}
