//! Kong's active-check extras against local servers on loopback: https with SNI and
//! certificate verification on and off, headers, concurrency, and the unhealthy interval.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpListener,
    sync::mpsc,
};

use super::*;
use crate::sources::config::TlsCheck;

const T: Duration = Duration::from_secs(10);

/// What a test server saw.
#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<String>>,
    sni: Mutex<Vec<Option<String>>>,
    in_flight: AtomicUsize,
    most: AtomicUsize,
}

/// Reads one request head and answers `status` after `delay`, counting requests in flight.
async fn answer(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    status: u16,
    delay: Duration,
    seen: &Seen,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.most.fetch_max(now, Ordering::SeqCst);
    seen.requests
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&buf).into_owned());
    tokio::time::sleep(delay).await;
    seen.in_flight.fetch_sub(1, Ordering::SeqCst);
    let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A plain HTTP server on `ip`, port `port` (0: any).
async fn http_server(
    ip: &str,
    port: u16,
    status: u16,
    delay: Duration,
    seen: Arc<Seen>,
) -> SocketAddr {
    let l = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), port))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move { answer(s, status, delay, &seen).await });
        }
    });
    addr
}

/// An HTTPS server with a self-signed certificate for web.example, recording the SNI of
/// each handshake.
async fn https_server(seen: Arc<Seen>) -> SocketAddr {
    let ck = rcgen::generate_simple_self_signed(vec!["web.example".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                seen.sni.lock().unwrap().push(sni);
                answer(tls, 200, Duration::ZERO, &seen).await;
            });
        }
    });
    addr
}

fn http_check(tls: Option<TlsCheck>, headers: &[(&str, &str)]) -> HealthCheck {
    HealthCheck {
        kind: CheckKind::Http {
            path: "/healthz".into(),
            statuses: vec![200],
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tls,
        },
        port: 0,
        interval: Duration::from_secs(3600),
        unhealthy_interval: None,
        timeout: Duration::from_secs(2),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
        concurrency: 0,
    }
}

async fn probe_once(check: &HealthCheck, addr: SocketAddr) -> Result<(), String> {
    let shared = builder().build().unwrap();
    let client = client_for(check, addr, &shared).expect("building the client");
    probe(check, addr, &client).await
}

#[tokio::test]
async fn an_https_check_sends_its_sni_and_succeeds_without_verification() {
    let seen = Arc::new(Seen::default());
    let addr = https_server(seen.clone()).await;
    let tls = TlsCheck {
        sni: Some("web.example".into()),
        verify: false,
    };
    let check = http_check(Some(tls), &[("x-probe", "lb"), ("x-probe", "again")]);
    probe_once(&check, addr).await.expect("the probe succeeds");
    assert_eq!(*seen.sni.lock().unwrap(), [Some("web.example".to_string())]);
    let req = seen.requests.lock().unwrap()[0].to_lowercase();
    assert!(req.starts_with("get /healthz http/1.1"), "{req}");
    assert!(req.contains("host: web.example"), "{req}");
    assert!(
        req.contains("x-probe: lb") && req.contains("x-probe: again"),
        "both header values are sent: {req}"
    );
}

#[tokio::test]
async fn an_https_check_without_sni_sends_none() {
    let seen = Arc::new(Seen::default());
    let addr = https_server(seen.clone()).await;
    let check = http_check(
        Some(TlsCheck {
            sni: None,
            verify: false,
        }),
        &[],
    );
    probe_once(&check, addr).await.expect("the probe succeeds");
    assert_eq!(*seen.sni.lock().unwrap(), [None]);
}

#[tokio::test]
async fn an_https_check_that_verifies_refuses_a_self_signed_certificate() {
    let seen = Arc::new(Seen::default());
    let addr = https_server(seen.clone()).await;
    let check = http_check(
        Some(TlsCheck {
            sni: Some("web.example".into()),
            verify: true,
        }),
        &[],
    );
    let err = probe_once(&check, addr).await.expect_err("not trusted");
    assert!(err.contains("https://web.example"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(
        seen.requests.lock().unwrap().is_empty(),
        "no request crosses an unverified handshake"
    );
}

/// A config whose VIP has four backends, 127.0.0.1..4, checked over HTTP on `port`. (A config
/// refuses loopback backends, which no packet can reach: written as 10.1.0.1..4, then moved to
/// where this test's servers listen.)
fn four_backends(port: u16) -> Config {
    let mut c = Config::parse(
        &format!(
            "node: {{ interfaces: [eth0], source_v4: 10.0.0.1, table_size: 1009 }}
vips:
  - {{ address: 192.0.2.1, port: 80, protocol: tcp,
      backends: [{{ address: 10.1.0.1 }}, {{ address: 10.1.0.2 }}, {{ address: 10.1.0.3 }}, {{ address: 10.1.0.4 }}],
      health_check: {{ type: http, port: {port}, path: /healthz, interval: 1h, timeout: 5s }} }}
"
        ),
        "t",
    )
    .unwrap();
    for (i, b) in c.vips[0].spec.backends.iter_mut().enumerate() {
        b.address = std::net::Ipv4Addr::new(127, 0, 0, i as u8 + 1).into();
    }
    c
}

/// Starts the checks of `four_backends` with `concurrency` against servers that take 300 ms
/// to answer; the most probes the servers saw at once.
async fn most_at_once(concurrency: u32) -> usize {
    let seen = Arc::new(Seen::default());
    let first = http_server(
        "127.0.0.1",
        0,
        200,
        Duration::from_millis(300),
        seen.clone(),
    )
    .await;
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        http_server(
            ip,
            first.port(),
            200,
            Duration::from_millis(300),
            seen.clone(),
        )
        .await;
    }
    let mut config = four_backends(first.port());
    config.vips[0].health_check.as_mut().unwrap().concurrency = concurrency;
    let (tx, _rx) = mpsc::channel(8);
    let mut checks = Checks::new(tx);
    checks.sync(&config, |_| true);
    let start = std::time::Instant::now();
    while seen.requests.lock().unwrap().len() < 4 || seen.in_flight.load(Ordering::SeqCst) > 0 {
        assert!(start.elapsed() < T, "the four probes did not all finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen.most.load(Ordering::SeqCst)
}

#[tokio::test]
async fn concurrency_limits_how_many_backends_are_probed_at_once() {
    assert_eq!(most_at_once(2).await, 2);
}

#[tokio::test]
async fn without_concurrency_every_backend_is_probed_at_once() {
    assert_eq!(most_at_once(0).await, 4);
}

#[tokio::test]
async fn an_unhealthy_backend_is_probed_at_the_unhealthy_interval() {
    let seen = Arc::new(Seen::default());
    let addr = http_server("127.0.0.1", 0, 500, Duration::ZERO, seen.clone()).await;
    let mut check = http_check(None, &[]);
    // Healthy backends: once an hour; unhealthy ones: every 100 ms.
    check.unhealthy_interval = Some(Duration::from_millis(100));
    let (tx, mut rx) = mpsc::channel(8);
    let key: CheckKey = ((VipKey::default(), addr.ip()), addr, check);
    let _task = spawn_one(&key, 1, true, builder().build().unwrap(), None, &tx);
    let t = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert!(!t.healthy, "a 500 is a failure");
    let start = std::time::Instant::now();
    while seen.requests.lock().unwrap().len() < 5 {
        assert!(
            start.elapsed() < T,
            "only {} probes",
            seen.requests.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
