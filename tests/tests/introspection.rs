//! Each running daemon's introspection matches `schemas/dbus/*.xml`, the source of truth for
//! the interfaces: same members, argument names, types and directions.

use std::collections::BTreeSet;

use evp_system_tests::system::{DAEMON_INTERFACES, System, schema_xml};

/// Everything about an interface that a caller depends on, in a comparable form.
fn signature_of(iface: &zbus_xml::Interface<'_>) -> BTreeSet<String> {
    let args = |args: &[zbus_xml::Arg]| {
        args.iter()
            .map(|a| {
                format!(
                    "{}:{}:{:?}",
                    a.name().unwrap_or_default(),
                    a.ty(),
                    a.direction()
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut out = BTreeSet::new();
    for m in iface.methods() {
        out.insert(format!("method {}({})", m.name(), args(m.args())));
    }
    for s in iface.signals() {
        out.insert(format!("signal {}({})", s.name(), args(s.args())));
    }
    for p in iface.properties() {
        out.insert(format!("property {} {} {:?}", p.name(), p.ty(), p.access()));
    }
    out
}

fn interface_in<'a>(node: &'a zbus_xml::Node<'a>, name: &str) -> &'a zbus_xml::Interface<'a> {
    node.interfaces()
        .iter()
        .find(|i| i.name() == name)
        .unwrap_or_else(|| panic!("interface {name} missing"))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_daemon_serves_exactly_its_schema() {
    let sys = System::start().await.unwrap();
    for (service, path, interface) in DAEMON_INTERFACES {
        let expected_xml = schema_xml(interface);
        let expected = zbus_xml::Node::from_reader(expected_xml.as_bytes()).unwrap();
        let proxy = zbus::fdo::IntrospectableProxy::builder(&sys.conn)
            .destination(service)
            .path(path)
            .build()
            .await
            .unwrap();
        let live_xml = proxy.introspect().await.unwrap();
        let live = zbus_xml::Node::from_reader(live_xml.as_bytes()).unwrap();
        let want = signature_of(interface_in(&expected, interface));
        let got = signature_of(interface_in(&live, interface));
        assert_eq!(
            got, want,
            "{service} at {path} differs from schemas/dbus/{interface}.xml"
        );
        assert!(!got.is_empty());
    }
    sys.stop().await;
}
