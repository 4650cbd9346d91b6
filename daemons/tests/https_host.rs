//! A host that serves its data plane over HTTPS (`tls_cert_file`), with the
//! real daemons as separate processes: it registers an `https://` URL;
//! the CLI, the master's one-call exec and the proxy (trusting the host's
//! CA through `hosts_ca_file`) all reach it over TLS, and get the same
//! answers, WebSockets (a terminal, an echo server in the project)
//! included; a proxy that does not trust the host's certificate refuses to
//! relay, saying why; plain HTTP to the host's port gets no answer. A
//! client asking for HTTP/2 (as browsers do) gets it, and the same answers.

use std::io::{Read, Write};
use std::time::Duration;

use cocalc_core::ExecRequest;

mod common;
use common::{
    api_key_of, blocking_post, bootstrap_token, cocalc_env, connections_to, eventually, free_port,
    host_config, ok, spawn_host, spawn_proxy, start_master,
};

#[test]
fn host_serves_https_to_the_cli_the_master_and_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (d.join("host.crt"), d.join("host.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    // The master and the CLI trust the host's certificate as a system root.
    let trust = [("SSL_CERT_FILE", cert.as_path())];
    let (_master, murl, admin) = start_master(d, &trust);
    let cli = |key: &str, args: &[&str], stdin: Option<&[u8]>| {
        cocalc_env(&murl, key, args, stdin, &trust)
    };
    let json =
        |o: std::process::Output| -> serde_json::Value { serde_json::from_str(&ok(&o)).unwrap() };
    let proxy_key = api_key_of(&cli(
        &admin,
        &["proxy-key", "create", "edge", "--json"],
        None,
    ));
    let alice = api_key_of(&cli(&admin, &["user", "create", "alice", "--json"], None));

    let token = bootstrap_token(&murl, &admin);
    let port = free_port();
    let metrics_port = free_port();
    let host_cfg = host_config(
        d,
        &format!(
            "listen = \"127.0.0.1:{port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
             metrics_listen = \"127.0.0.1:{metrics_port}\"",
            cert.display(),
            key.display()
        ),
        &murl,
        &token,
    );
    let url = format!("https://127.0.0.1:{port}");
    let host = spawn_host(&host_cfg);
    assert!(
        host.line.ends_with(&format!("listening on {url}")),
        "{}",
        host.line
    );
    eventually("the host is up", Duration::from_secs(20), || {
        let o = cli(&admin, &["host", "list", "--json"], None);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v.as_array().is_some_and(|a| {
            a.iter()
                .any(|h| h["state"] == "up" && h["endpoint"]["value"] == url.as_str())
        })
    });

    // The CLI, straight to the host over HTTPS.
    ok(&cli(&alice, &["project", "create", "p"], None));
    let open = json(cli(&alice, &["project", "open", "p", "--json"], None));
    assert_eq!(open["endpoint"]["value"], url.as_str());
    let project: cocalc_core::ProjectId = open["project"].as_str().unwrap().parse().unwrap();
    let connect_token = open["token"].as_str().unwrap().to_string();
    let script = "echo \"$((6 * 7)) over tls\"; exit 3";
    let direct = cli(
        &alice,
        &["project", "exec", "p", "--", "sh", "-c", script],
        None,
    );
    assert_eq!(direct.status.code(), Some(3), "{direct:?}");
    assert_eq!(String::from_utf8_lossy(&direct.stdout), "42 over tls\n");
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    ok(&cli(&alice, &["file", "put", "p", "big.bin"], Some(&big)));
    let got = cli(&alice, &["file", "get", "p", "big.bin"], None);
    assert!(
        got.status.success() && got.stdout == big,
        "the file came back different"
    );

    // The master's one-call exec forwards to the host over HTTPS.
    let r = blocking_post(
        &format!("{murl}/v1/projects/{project}/exec"),
        &alice,
        serde_json::json!({ "argv": ["sh", "-c", script] }),
    );
    let r: cocalc_core::wire::ExecResult = serde_json::from_value(r).unwrap();
    assert_eq!((r.exit_code, &r.stdout[..]), (3, &b"42 over tls\n"[..]));

    // The proxy, told to trust the host's CA, relays over TLS and answers
    // as the host does.
    let proxy_at = |name: &str, extra: &str| {
        let listen = free_port();
        let cfg = d.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{listen}\"\nmaster_url = \"{murl}\"\n\
                 api_key = \"{proxy_key}\"\n{extra}"
            ),
        )
        .unwrap();
        let p = spawn_proxy(&cfg);
        (p, format!("http://127.0.0.1:{listen}"))
    };
    let (proxy, purl) = proxy_at(
        "proxy",
        &format!("hosts_ca_file = \"{}\"\n", cert.display()),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let exec = ExecRequest::new(vec!["sh".into(), "-c".into(), script.into()]);
    let via = rt
        .block_on(
            cocalc_client::HostClient::new(purl.clone(), project, connect_token.clone())
                .exec(&exec),
        )
        .unwrap();
    assert_eq!(via.exit_code, 3);
    assert_eq!(via.stdout, direct.stdout);
    let back = rt
        .block_on(
            cocalc_client::HostClient::new(purl.clone(), project, connect_token.clone())
                .read("big.bin"),
        )
        .unwrap();
    assert!(
        back == big,
        "the file came back different through the proxy"
    );
    // WebSockets through the proxy: a terminal the host serves itself, and
    // an echo server in the project (the process runner's projects share
    // the host's network), each relayed over the TLS connection.
    rt.block_on(async {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
        let ws_to = |path: String| {
            let mut req = format!("{}/{project}/{path}", purl.replacen("http://", "ws://", 1))
                .into_client_request()
                .unwrap();
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {connect_token}").parse().unwrap(),
            );
            tokio_tungstenite::connect_async(req)
        };
        let (mut term, _) = ws_to("terminal".into()).await.unwrap();
        term.send(Message::Binary(b"echo tty-$((40+2))\n".to_vec().into()))
            .await
            .unwrap();
        let mut seen = String::new();
        while !seen.contains("tty-42") {
            match tokio::time::timeout(Duration::from_secs(10), term.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Ok(_))) => {}
                other => panic!("terminal ended: {other:?}; saw {seen:?}"),
            }
        }
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (s, _) = echo.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() || ws.send(m).await.is_err() {
                    break;
                }
            }
        });
        let (mut ws, _) = ws_to(format!("port/{echo_port}/")).await.unwrap();
        let frames = [
            Message::Text("over tls".into()),
            Message::Binary((0..300_000u32).map(|i| i as u8).collect::<Vec<u8>>().into()),
        ];
        for f in &frames {
            ws.send(f.clone()).await.unwrap();
            let back = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            assert_eq!(&back.unwrap().unwrap().unwrap(), f);
        }
        ws.close(None).await.unwrap();
    });
    assert!(
        connections_to(proxy.child.id(), port) >= 1,
        "the proxy keeps its connection to the host's TLS port"
    );

    // HTTP/2 straight to the host, as a browser asks for it (ALPN `h2`):
    // exec, a 2 MB file (more than HTTP/2's first flow-control window) and
    // a server in the project, all on one connection.
    rt.block_on(async {
        use http_body_util::BodyExt;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
            .connect(
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (h2, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let send = |method: &str, path: String, body: String| {
            let mut h2 = h2.clone();
            let req = hyper::Request::builder()
                .method(method)
                .uri(format!("https://files.example:{port}/{project}/{path}"))
                .header("authorization", format!("Bearer {connect_token}"))
                .header("content-type", "application/json")
                .body(body)
                .unwrap();
            async move {
                let r = h2.send_request(req).await.unwrap();
                assert_eq!(r.version(), hyper::Version::HTTP_2);
                let status = r.status().as_u16();
                (status, r.into_body().collect().await.unwrap().to_bytes())
            }
        };
        let (status, body) = send(
            "POST",
            "exec".into(),
            serde_json::json!({ "argv": ["sh", "-c", script] }).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{body:?}");
        let r: cocalc_core::wire::ExecResult = serde_json::from_slice(&body).unwrap();
        assert_eq!((r.exit_code, &r.stdout[..]), (3, &direct.stdout[..]));
        let (status, body) = send("GET", "files/big.bin".into(), String::new()).await;
        assert_eq!(status, 200);
        assert!(body[..] == big[..], "the file came back different over h2");
        // A server in the project gets HTTP/1.1 with the client's Host.
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = server.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.unwrap() == 0 {
                    return;
                }
                head.push(b[0]);
            }
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", head.len());
            s.write_all(answer.as_bytes()).await.unwrap();
            s.write_all(&head).await.unwrap();
        });
        let (status, body) = send("GET", format!("port/{server_port}/a?b=1"), String::new()).await;
        let head = String::from_utf8_lossy(&body).to_lowercase();
        assert_eq!(status, 200, "{head}");
        assert!(head.starts_with("get /a?b=1 http/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("\r\nhost: files.example:{port}\r\n")),
            "{head}"
        );
        assert!(!head.contains("authorization"), "{head}");

        // A terminal on the same connection (RFC 8441), served by the
        // host's own WebSocket handler.
        let mut connect = hyper::Request::builder()
            .method("CONNECT")
            .uri(format!("https://files.example:{port}/{project}/terminal"))
            .header("authorization", format!("Bearer {connect_token}"))
            .header("sec-websocket-version", "13")
            .body(String::new())
            .unwrap();
        connect
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let r = h2.clone().send_request(connect).await.unwrap();
        assert_eq!(r.status(), 200, "{r:?}");
        let upgraded = hyper::upgrade::on(r).await.unwrap();
        let mut term = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        term.send(Message::Binary(b"echo h2-$((40+2))\n".to_vec().into()))
            .await
            .unwrap();
        let mut seen = String::new();
        while !seen.contains("h2-42") {
            match tokio::time::timeout(Duration::from_secs(10), term.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Ok(_))) => {}
                other => panic!("terminal over HTTP/2 ended: {other:?}; saw {seen:?}"),
            }
        }
        term.close(None).await.unwrap();
    });

    // A proxy without the host's CA refuses to relay, and says why.
    let (_untrusting, uurl) = proxy_at("untrusting", "");
    let e = rt
        .block_on(cocalc_client::HostClient::new(uurl, project, connect_token).exec(&exec))
        .unwrap_err();
    assert_eq!(
        (e.status, e.code.as_str()),
        (502, "host_unreachable"),
        "{e:?}"
    );
    assert!(e.message.contains("certificate"), "{e:?}");

    // Plain HTTP to the host's TLS port is not answered as HTTP, and the
    // failed handshake is counted.
    let tls_failures = || -> u64 {
        let mut m = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
        m.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        m.read_to_string(&mut text).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("cocalc_host_tls_handshake_failures_total "))
            .unwrap_or_else(|| panic!("no TLS failure count in:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    let failures_before = tls_failures();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    eventually(
        "the failed handshake is counted",
        Duration::from_secs(10),
        || tls_failures() == failures_before + 1,
    );
}
