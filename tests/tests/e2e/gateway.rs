//! The gateway over real sockets in front of real services and a real
//! nats-server: every public path routed, bearer tokens on writes (and 401
//! for every kind of bad one, with nothing appended), `Actor` and
//! `Correlation-Id` in the events, and dead or slow upstreams answered
//! within a bounded time while the other routes keep working.

use std::time::{Duration, Instant};

use e2e_tests::{InProcessService, Reply, StreamReader, http_client, msg_header, start_nats};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "e2e-gateway-secret-of-at-least-32-bytes";
/// An Ed25519 key pair made for these tests (`openssl genpkey -algorithm ed25519`).
const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIMRWr51MCm8vIVnSo242oNRCBmpdhYD6/5Sdui0E8GtS
-----END PRIVATE KEY-----
";
const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEANk2mUrzcnV5jSUA+SS+OrjpNho7WD2FEwqykg6lSqao=
-----END PUBLIC KEY-----
";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()).expect("key"),
    )
    .expect("encode")
}

fn token(sub: &str) -> String {
    hs256(&json!({"sub": sub, "exp": now() + 600}), SECRET)
}

/// A gateway configuration for these upstreams, with HS256 [`SECRET`].
fn config(
    posts_command: &str,
    posts_query: &[&str],
    comments_command: &str,
    reports_query: &str,
) -> gateway::Config {
    gateway::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        posts_command_url: posts_command.into(),
        posts_query_url: posts_query.iter().map(|s| (*s).to_string()).collect(),
        comments_command_url: comments_command.into(),
        reports_query_url: reports_query.into(),
        posts_query_admin_url: None,
        reports_query_admin_url: None,
        jwt_secret: Some(SECRET.into()),
        jwt_public_key_file: None,
        jwt_audience: None,
        jwt_issuer: None,
        upstream_timeout_ms: 10_000,
        connect_timeout_ms: 1_000,
    }
}

/// Every service and the gateway in front of them.
struct Platform {
    nats: testkit::NatsServer,
    _posts: InProcessService,
    _comments: InProcessService,
    _query: InProcessService,
    _reports: InProcessService,
    gateway: InProcessService,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    http: reqwest::Client,
}

impl Platform {
    async fn start() -> anyhow::Result<Self> {
        let nats = start_nats().await?;
        let url = nats.url();
        let posts = InProcessService::start_command(&url).await?;
        let comments = InProcessService::start_comments(&url).await?;
        let query_dir = tempfile::tempdir()?;
        let reports_dir = tempfile::tempdir()?;
        let query = InProcessService::start_query(&url, query_dir.path()).await?;
        let reports = InProcessService::start_reports(&url, reports_dir.path()).await?;
        let gateway = InProcessService::start_gateway(&config(
            &posts.base_url,
            &[&query.base_url],
            &comments.base_url,
            &reports.base_url,
        ))
        .await?;
        Ok(Self {
            nats,
            _posts: posts,
            _comments: comments,
            _query: query,
            _reports: reports,
            gateway,
            _dirs: (query_dir, reports_dir),
            http: http_client(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.base_url)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        Reply::of(self.http.get(self.url(path))).await
    }

    async fn last_seqs(&self) -> anyhow::Result<(u64, u64)> {
        let posts = StreamReader::connect_to(&self.nats.url(), "POSTS").await?;
        let comments = StreamReader::connect_to(&self.nats.url(), "COMMENTS").await?;
        Ok((posts.last_seq().await?, comments.last_seq().await?))
    }
}

#[tokio::test]
async fn every_public_path_is_routed_and_writes_carry_actor_and_correlation() -> anyhow::Result<()>
{
    let env = Platform::start().await?;
    let http = &env.http;
    let bearer = format!("Bearer {}", token("alice"));

    // A write with a token, a request id, and a forged Actor that must not win.
    let created = Reply::of(
        http.post(env.url("/posts"))
            .header("authorization", &bearer)
            .header("x-request-id", "req-create-1")
            .header("actor", "mallory")
            .json(&json!({"title": "Gateway post", "content": "routed through", "author_name": "ann"})),
    )
    .await?;
    let ack = created.ack(201);
    assert_eq!(created.header("x-request-id"), Some("req-create-1"));
    assert_eq!(created.header("etag"), Some("\"1\""));
    let id = ack.post_id.clone();
    assert_eq!(
        created.header("location"),
        Some(format!("/posts/{id}").as_str())
    );

    let patched = Reply::of(
        http.patch(env.url(&format!("/posts/{id}")))
            .header("authorization", &bearer)
            .header("if-match", "\"1\"")
            .json(&json!({"title": "Gateway post, edited"})),
    )
    .await?;
    let patch_ack = patched.ack(200);
    // No X-Request-Id from the client: the gateway makes one and returns it.
    let generated = patched
        .header("x-request-id")
        .expect("a generated request id")
        .to_string();
    assert!(!generated.is_empty());

    // A PATCH that changes nothing appends nothing and answers the current
    // version.
    let same = Reply::of(
        http.patch(env.url(&format!("/posts/{id}")))
            .header("authorization", &bearer)
            .json(&json!({"title": "Gateway post, edited", "author_name": "ann"})),
    )
    .await?;
    assert_eq!(same.header("etag"), Some("\"2\""));
    assert_eq!(same.ack(200), patch_ack, "a no-op PATCH");

    // Reads, with read-your-writes through min_seq, and the version as ETag.
    let one = env
        .get(&format!("/posts/{id}?min_seq={}", patch_ack.seq))
        .await?;
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(one.header("etag"), Some("\"2\""));
    assert_eq!(one.json()["data"]["title"], "Gateway post, edited");
    assert!(one.header("x-request-id").is_some());
    let list = env
        .get(&format!("/posts?min_seq={}", patch_ack.seq))
        .await?;
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(list.json()["data"][0]["post_id"], id.as_str());
    let found = env
        .get(&format!("/posts/search?q=edited&min_seq={}", patch_ack.seq))
        .await?;
    assert_eq!(found.status, 200, "{found:?}");
    assert_eq!(found.json()["data"][0]["post_id"], id.as_str());
    let history = env.get(&format!("/posts/{id}/events")).await?;
    assert_eq!(history.status, 200, "{history:?}");
    assert_eq!(history.json()["data"].as_array().map(Vec::len), Some(2));

    // Comments: add, read, edit, remove.
    let added = Reply::of(
        http.post(env.url(&format!("/posts/{id}/comments")))
            .header("authorization", format!("Bearer {}", token("bob")))
            .header("x-request-id", "req-comment-1")
            .json(&json!({"body": "first!", "author_name": "bo"})),
    )
    .await?;
    assert_eq!(added.status, 201, "{added:?}");
    let comment_id = added.json()["comment_id"]
        .as_str()
        .expect("comment_id")
        .to_string();
    assert_eq!(
        added.header("location"),
        Some(format!("/posts/{id}/comments/{comment_id}").as_str())
    );
    let comment_seq = added.json()["seq"].as_u64().expect("seq");
    let comments = env
        .get(&format!(
            "/posts/{id}/comments?min_seq=COMMENTS:{comment_seq}"
        ))
        .await?;
    assert_eq!(comments.status, 200, "{comments:?}");
    assert_eq!(
        comments.json()["data"][0]["comment_id"],
        comment_id.as_str()
    );
    let comment = env
        .get(&format!(
            "/posts/{id}/comments/{comment_id}?min_seq=COMMENTS:{comment_seq}"
        ))
        .await?;
    assert_eq!(comment.status, 200, "{comment:?}");
    assert_eq!(comment.header("etag"), Some("\"1\""));
    // Both reads of one item: the same shape. Ids first, then the fields,
    // then the times (UTC, six fractional digits) and the version.
    let order = |body: &str, keys: &[&str]| {
        let at: Vec<usize> = keys
            .iter()
            .map(|k| body.find(&format!("\"{k}\":")).unwrap_or(usize::MAX))
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{keys:?} in {body}");
    };
    order(
        &one.body,
        &[
            "post_id",
            "title",
            "content",
            "author_name",
            "created_at",
            "updated_at",
            "version",
        ],
    );
    order(
        &comment.body,
        &[
            "comment_id",
            "post_id",
            "body",
            "author_name",
            "created_at",
            "updated_at",
            "version",
        ],
    );
    for (reply, field) in [
        (&one, "created_at"),
        (&one, "updated_at"),
        (&comment, "created_at"),
    ] {
        let t = reply.json()["data"][field]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let b = t.as_bytes();
        assert!(
            t.len() == 27 && b[10] == b'T' && b[19] == b'.' && t.ends_with('Z'),
            "{field}: {t:?}"
        );
    }
    let unchanged = Reply::of(
        http.patch(env.url(&format!("/posts/{id}/comments/{comment_id}")))
            .header("authorization", format!("Bearer {}", token("bob")))
            .json(&json!({"body": "first!"})),
    )
    .await?;
    assert_eq!(unchanged.status, 200, "{unchanged:?}");
    assert_eq!(
        unchanged.json()["seq"].as_u64(),
        Some(comment_seq),
        "a no-op edit"
    );
    let edited = Reply::of(
        http.patch(env.url(&format!("/posts/{id}/comments/{comment_id}")))
            .header("authorization", format!("Bearer {}", token("bob")))
            .json(&json!({"body": "second thoughts"})),
    )
    .await?;
    assert_eq!(edited.status, 200, "{edited:?}");
    let removed = Reply::of(
        http.delete(env.url(&format!("/posts/{id}/comments/{comment_id}")))
            .header("authorization", format!("Bearer {}", token("bob"))),
    )
    .await?;
    assert_eq!(removed.status, 200, "{removed:?}");
    let last_comment_seq = removed.json()["seq"].as_u64().expect("seq");

    // Reports, once they have read both streams.
    let min_seq = format!("POSTS:{},COMMENTS:{last_comment_seq}", patch_ack.seq);
    let authors = env
        .get(&format!("/reports/authors?min_seq={min_seq}"))
        .await?;
    assert_eq!(authors.status, 200, "{authors:?}");
    let ann = env
        .get(&format!("/reports/authors/ann?min_seq={min_seq}"))
        .await?;
    assert_eq!(ann.status, 200, "{ann:?}");
    assert_eq!(ann.json()["data"]["author_name"], "ann");

    // Each service's projections, and the gateway's own probes.
    for (service, projection) in [
        ("posts-query", "post-view"),
        ("reports-query", "author-stats"),
        ("comments-command", "post-deleted-cascade"),
    ] {
        let r = env.get(&format!("/projections/{service}")).await?;
        assert_eq!(r.status, 200, "{service}: {r:?}");
        assert!(
            r.body.contains(projection),
            "{service} lists {projection}: {}",
            r.body
        );
    }
    env.get("/projections/nope")
        .await?
        .assert_problem(404, "no service");
    assert_eq!(env.get("/livez").await?.status, 200);
    let ready = env.get("/readyz").await?;
    assert_eq!(ready.status, 200, "{ready:?}");
    let upstreams = ready.json()["upstreams"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = upstreams
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "posts-command",
            "posts-query",
            "comments-command",
            "reports-query"
        ]
    );
    // The OpenAPI document of every route, and its interactive docs.
    let doc = env.get("/openapi.json").await?;
    assert_eq!(doc.status, 200, "{doc:?}");
    let doc = doc.json();
    assert_eq!(doc["openapi"], "3.1.0");
    for (method, path) in [
        ("post", "/posts"),
        ("get", "/posts/search"),
        ("patch", "/posts/{id}/comments/{comment_id}"),
        ("get", "/reports/authors/{author_name}"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} documented"
        );
    }
    assert!(doc["paths"]["/posts"]["post"]["security"].is_array());
    // Valid under a standard validator (openapi-spec-validator, from
    // OPENAPI_SPEC_VALIDATOR_BIN or PATH; `just test` installs it).
    let file = tempfile::NamedTempFile::with_suffix(".json")?;
    std::fs::write(file.path(), doc.to_string())?;
    let validator = std::env::var("OPENAPI_SPEC_VALIDATOR_BIN")
        .unwrap_or_else(|_| "openapi-spec-validator".into());
    let checked = tokio::process::Command::new(&validator)
        .arg(file.path())
        .output()
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot run {validator} ({e}): run `just test`, which installs it")
        })?;
    assert!(
        checked.status.success(),
        "the OpenAPI document is invalid: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let docs = env.get("/docs").await?;
    assert_eq!(docs.status, 200);
    assert!(
        docs.header("content-type")
            .is_some_and(|c| c.starts_with("text/html"))
    );
    env.get("/nowhere")
        .await?
        .assert_problem(404, "no such route");
    let wrong_method = Reply::of(http.put(env.url("/posts"))).await?;
    wrong_method.assert_problem(405, "method");

    // A live comment, then the post's deletion with a trace context: the
    // cascade's removal continues that trace.
    let live = Reply::of(
        http.post(env.url(&format!("/posts/{id}/comments")))
            .header("authorization", format!("Bearer {}", token("bob")))
            .json(&json!({"body": "still here", "author_name": "bo"})),
    )
    .await?;
    assert_eq!(live.status, 201, "{live:?}");
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let deleted = Reply::of(
        http.delete(env.url(&format!("/posts/{id}")))
            .header("authorization", &bearer)
            .header("traceparent", trace),
    )
    .await?;
    assert_eq!(deleted.ack(200).version, 3);

    // The events: Actor from the token's sub (never the client's header),
    // Correlation-Id from X-Request-Id.
    let posts = StreamReader::connect_to(&env.nats.url(), "POSTS").await?;
    let events = posts.all_messages().await?;
    assert_eq!(events.len(), 3);
    for e in &events {
        assert_eq!(msg_header(e, "Actor"), Some("alice"));
    }
    assert_eq!(
        msg_header(&events[0], "Correlation-Id"),
        Some("req-create-1")
    );
    assert_eq!(
        msg_header(&events[1], "Correlation-Id"),
        Some(generated.as_str())
    );
    // W3C trace context: the one sent, or a new trace per request.
    assert_eq!(msg_header(&events[2], "traceparent"), Some(trace));
    let made = msg_header(&events[0], "traceparent").unwrap_or_default();
    assert!(
        made.starts_with("00-") && made.len() == 55 && made != trace,
        "{made}"
    );
    let comments = StreamReader::connect_to(&env.nats.url(), "COMMENTS").await?;
    let removal = e2e_tests::wait_for("the cascade's removal", Duration::from_secs(30), || async {
        let msgs = comments.all_messages().await.ok()?;
        msgs.into_iter().find(|m| {
            msg_header(m, "Event-Type") == Some("CommentRemoved")
                && msg_header(m, "Causation-Id") != msg_header(m, "Correlation-Id")
                && m.subject
                    .ends_with(live.json()["comment_id"].as_str().unwrap_or("?"))
        })
    })
    .await?;
    assert_eq!(
        msg_header(&removal, "traceparent"),
        Some(trace),
        "the cascade continues the trace"
    );
    let comment_events = comments.all_messages().await?;
    assert_eq!(msg_header(&comment_events[0], "Actor"), Some("bob"));
    assert_eq!(
        msg_header(&comment_events[0], "Correlation-Id"),
        Some("req-comment-1")
    );
    Ok(())
}

#[tokio::test]
async fn a_write_without_a_valid_token_gets_401_and_appends_nothing() -> anyhow::Result<()> {
    let env = Platform::start().await?;
    let http = &env.http;
    let bearer = format!("Bearer {}", token("alice"));
    let created = Reply::of(
        http.post(env.url("/posts"))
            .header("authorization", &bearer)
            .json(&json!({"title": "t", "content": "c", "author_name": "ann"})),
    )
    .await?;
    let id = created.ack(201).post_id;
    let added = Reply::of(
        http.post(env.url(&format!("/posts/{id}/comments")))
            .header("authorization", &bearer)
            .json(&json!({"body": "b", "author_name": "bo"})),
    )
    .await?;
    assert_eq!(added.status, 201, "{added:?}");
    let comment_id = added.json()["comment_id"].as_str().expect("id").to_string();
    let before = env.last_seqs().await?;

    let valid = token("alice");
    let (header_b64, payload_b64) = {
        let mut parts = valid.split('.');
        (
            parts.next().expect("header").to_string(),
            parts.next().expect("payload").to_string(),
        )
    };
    // {"alg":"none","typ":"JWT"}
    let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
    let bad: Vec<(&str, Option<String>, &str)> = vec![
        ("no header", None, "authorization"),
        ("basic auth", Some("Basic YWxpY2U6cHc=".into()), "bearer"),
        ("not a JWT", Some("Bearer not-a-jwt".into()), "malformed"),
        (
            "another secret",
            Some(format!(
                "Bearer {}",
                hs256(
                    &json!({"sub": "alice", "exp": now() + 600}),
                    "another-secret-of-at-least-32-bytes!!"
                )
            )),
            "signature",
        ),
        (
            "expired beyond the leeway",
            Some(format!(
                "Bearer {}",
                hs256(&json!({"sub": "alice", "exp": now() - 30}), SECRET)
            )),
            "expired",
        ),
        (
            "no exp",
            Some(format!(
                "Bearer {}",
                hs256(&json!({"sub": "alice"}), SECRET)
            )),
            "exp",
        ),
        (
            "no sub",
            Some(format!(
                "Bearer {}",
                hs256(&json!({"exp": now() + 600}), SECRET)
            )),
            "sub",
        ),
        (
            "empty sub",
            Some(format!(
                "Bearer {}",
                hs256(&json!({"sub": "", "exp": now() + 600}), SECRET)
            )),
            "sub",
        ),
        (
            "alg none",
            Some(format!("Bearer {none_header}.{payload_b64}.")),
            "algorithm",
        ),
        (
            "signature stripped",
            Some(format!("Bearer {header_b64}.{payload_b64}.")),
            "signature",
        ),
        (
            "EdDSA token for an HS256 gateway",
            Some(format!(
                "Bearer {}",
                jsonwebtoken::encode(
                    &Header::new(Algorithm::EdDSA),
                    &json!({"sub": "alice", "exp": now() + 600}),
                    &EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes())?,
                )?
            )),
            "algorithm",
        ),
    ];
    let writes = [
        (
            reqwest::Method::POST,
            "/posts".to_string(),
            json!({"title": "t", "content": "c", "author_name": "ann"}),
        ),
        (
            reqwest::Method::PATCH,
            format!("/posts/{id}"),
            json!({"title": "x"}),
        ),
        (reqwest::Method::DELETE, format!("/posts/{id}"), json!(null)),
        (
            reqwest::Method::POST,
            format!("/posts/{id}/comments"),
            json!({"body": "b", "author_name": "bo"}),
        ),
        (
            reqwest::Method::PATCH,
            format!("/posts/{id}/comments/{comment_id}"),
            json!({"body": "x"}),
        ),
        (
            reqwest::Method::DELETE,
            format!("/posts/{id}/comments/{comment_id}"),
            json!(null),
        ),
    ];
    for (what, authorization, detail) in &bad {
        for (method, path, body) in &writes {
            let mut req = http.request(method.clone(), env.url(path));
            if !body.is_null() {
                req = req.json(body);
            }
            if let Some(a) = authorization {
                req = req.header("authorization", a);
            }
            let r = Reply::of(req).await?;
            assert_eq!(r.status, 401, "{what} on {method} {path}: {r:?}");
            r.assert_problem(401, detail);
            let challenge = r.header("www-authenticate").unwrap_or_default();
            assert!(
                challenge.starts_with("Bearer realm=\"gateway\""),
                "{what}: {challenge:?}"
            );
            if authorization.is_some() {
                assert!(challenge.contains("invalid_token"), "{what}: {challenge:?}");
            }
        }
    }
    assert_eq!(env.last_seqs().await?, before, "a refused write appended");

    // A problem's type resolves, against the answer's URL, to its page on
    // the gateway (RFC 9457: dereferenceable, human-readable).
    let refused = Reply::of(http.post(env.url("/posts")).json(&writes[0].2)).await?;
    let kind = refused.assert_problem(401, "bearer")["type"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let page = Reply::of(http.get(env.url(&kind))).await?;
    assert_eq!(page.status, 200, "{kind}: {page:?}");
    assert!(
        page.header("content-type")
            .unwrap_or_default()
            .starts_with("text/html")
    );
    assert!(
        page.body.contains("Unauthorized") && page.body.contains("WWW-Authenticate"),
        "{}",
        page.body
    );
    let index = Reply::of(http.get(env.url("/docs/problems"))).await?;
    assert_eq!(index.status, 200);
    for t in servicekit::PROBLEM_TYPES {
        assert!(
            index.body.contains(&format!("/docs/problems/{}", t.slug)),
            "{} missing",
            t.slug
        );
    }
    Reply::of(http.get(env.url("/docs/problems/no-such-type")))
        .await?
        .assert_problem(404, "no problem type");

    // Within the leeway, an expired token still passes.
    let late = hs256(&json!({"sub": "alice", "exp": now() - 2}), SECRET);
    let r = Reply::of(
        http.patch(env.url(&format!("/posts/{id}")))
            .header("authorization", format!("Bearer {late}"))
            .json(&json!({"title": "late but fine"})),
    )
    .await?;
    assert_eq!(r.status, 200, "{r:?}");
    // Reads need no token.
    let read = env.get(&format!("/posts/{id}/events")).await?;
    assert_eq!(read.status, 200, "{read:?}");
    Ok(())
}

#[tokio::test]
async fn eddsa_tokens_and_a_configured_audience_and_issuer() -> anyhow::Result<()> {
    let nats = start_nats().await?;
    let posts = InProcessService::start_command(&nats.url()).await?;
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("gateway.pub.pem");
    std::fs::write(&key_file, ED_PUBLIC)?;
    let mut cfg = config(
        &posts.base_url,
        &["http://127.0.0.1:9"],
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
    );
    cfg.jwt_secret = None;
    cfg.jwt_public_key_file = Some(key_file);
    cfg.jwt_audience = Some("posts-api".into());
    cfg.jwt_issuer = Some("https://issuer.test".into());
    let gw = InProcessService::start_gateway(&cfg).await?;
    let http = http_client();
    let ed = |claims: Value| -> anyhow::Result<String> {
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes())?,
        )?)
    };
    let create = |token: String| {
        Reply::of(
            http.post(format!("{}/posts", gw.base_url))
                .header("authorization", format!("Bearer {token}"))
                .json(&json!({"title": "t", "content": "c", "author_name": "ann"})),
        )
    };
    let exp = now() + 600;
    let good =
        ed(json!({"sub": "carol", "exp": exp, "aud": "posts-api", "iss": "https://issuer.test"}))?;
    let _ = create(good).await?.ack(201);
    create(ed(
        json!({"sub": "carol", "exp": exp, "aud": "other", "iss": "https://issuer.test"}),
    )?)
    .await?
    .assert_problem(401, "audience");
    create(ed(
        json!({"sub": "carol", "exp": exp, "aud": "posts-api", "iss": "https://evil.test"}),
    )?)
    .await?
    .assert_problem(401, "issuer");
    // An HS256 token signed with the public key's bytes (the classic
    // algorithm confusion) is refused.
    create(hs256(
        &json!({"sub": "carol", "exp": exp, "aud": "posts-api", "iss": "https://issuer.test"}),
        ED_PUBLIC,
    ))
    .await?
    .assert_problem(401, "algorithm");
    let stream = StreamReader::connect_to(&nats.url(), "POSTS").await?;
    assert_eq!(stream.last_seq().await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_dead_or_slow_upstream_is_answered_in_bounded_time_and_the_rest_still_works()
-> anyhow::Result<()> {
    let nats = start_nats().await?;
    let url = nats.url();
    let posts = InProcessService::start_command(&url).await?;
    let dir = tempfile::tempdir()?;
    let query = InProcessService::start_query(&url, dir.path()).await?;
    // A port nothing listens on, and one that accepts and never answers.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}", l.local_addr()?)
    };
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent_url = format!("http://{}", silent.local_addr()?);
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let mut cfg = config(
        &posts.base_url,
        // A dead replica first: reads fail over to the live one.
        &[&dead, &query.base_url],
        &dead,
        &silent_url,
    );
    cfg.upstream_timeout_ms = 1_000;
    let gw = InProcessService::start_gateway(&cfg).await?;
    let http = http_client();
    let g = |path: &str| format!("{}{path}", gw.base_url);

    let started = Instant::now();
    let r = Reply::of(
        http.post(g("/posts/0190a8c2-0000-7000-8000-000000000001/comments"))
            .header("authorization", format!("Bearer {}", token("alice")))
            .json(&json!({"body": "b", "author_name": "bo"})),
    )
    .await?;
    r.assert_problem(502, "comments-command is unreachable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let r = Reply::of(http.get(g("/reports/authors"))).await?;
    r.assert_problem(504, "reports-query did not answer within 1000 ms");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // The rest still works, reads on every try despite the dead replica.
    let created = Reply::of(
        http.post(g("/posts"))
            .header("authorization", format!("Bearer {}", token("alice")))
            .json(&json!({"title": "t", "content": "c", "author_name": "ann"})),
    )
    .await?
    .ack(201);
    for _ in 0..4 {
        let r = Reply::of(http.get(g(&format!(
            "/posts/{}?min_seq={}",
            created.post_id, created.seq
        ))))
        .await?;
        assert_eq!(r.status, 200, "{r:?}");
    }

    let started = Instant::now();
    let ready = Reply::of(http.get(g("/readyz"))).await?;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let upstreams = ready.json()["upstreams"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let state = |name: &str, url: &str| {
        upstreams
            .iter()
            .find(|u| u["name"] == name && u["url"] == url)
            .map(|u| u["ready"].clone())
    };
    assert_eq!(state("posts-command", &posts.base_url), Some(json!(true)));
    assert_eq!(state("posts-query", &query.base_url), Some(json!(true)));
    assert_eq!(state("posts-query", &dead), Some(json!(false)));
    assert_eq!(state("comments-command", &dead), Some(json!(false)));
    assert_eq!(state("reports-query", &silent_url), Some(json!(false)));
    held.abort();
    Ok(())
}

/// The schema-driven fuzz run (schemathesis, from `SCHEMATHESIS_BIN` or
/// `PATH`; `just test` installs the pinned one): bounded examples of every
/// operation of `/openapi.json`, valid and invalid, with a token, through
/// the gateway to the real services. No answer may be a 5xx other than a
/// 503 with `Retry-After` (a read's `min_seq` not reached: the documented
/// backpressure), and every answer must match the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_driven_fuzz_run_through_the_gateway_finds_no_server_error() -> anyhow::Result<()>
{
    const FUZZ_DEADLINE: Duration = Duration::from_secs(600);
    let bin = std::env::var("SCHEMATHESIS_BIN").unwrap_or_else(|_| "schemathesis".into());
    let env = Platform::start().await?;
    // Something for the reads to find.
    let bearer = format!("Bearer {}", token("fuzz"));
    let id = Reply::of(
        env.http
            .post(env.url("/posts"))
            .header("authorization", &bearer)
            .json(&json!({"title": "fuzz", "content": "seed post", "author_name": "ann"})),
    )
    .await?
    .ack(201)
    .post_id;
    let added = Reply::of(
        env.http
            .post(env.url(&format!("/posts/{id}/comments")))
            .header("authorization", &bearer)
            .json(&json!({"body": "seed", "author_name": "bo"})),
    )
    .await?;
    assert_eq!(added.status, 201, "{added:?}");
    let hooks = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/hooks.py");
    let report = tempfile::tempdir()?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("run")
        .arg(env.url("/openapi.json"))
        .args([
            "--checks",
            "no_unexpected_server_error,response_schema_conformance",
        ])
        .args(["-H", &format!("Authorization: {bearer}")])
        .args([
            "--max-examples",
            "15",
            "--seed",
            "20261207",
            "--workers",
            "1",
        ])
        .args(["--request-timeout", "15"])
        .arg("--report-dir")
        .arg(report.path())
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("PYTHONPATH", hooks.parent().expect("dir"))
        .env("NO_COLOR", "1")
        // Its cache directory lands in the working directory: not the repo.
        .current_dir(report.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(FUZZ_DEADLINE, cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("the fuzz run took over {FUZZ_DEADLINE:?}"))?
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run {bin} ({e}): run `just test`, which installs it, or set SCHEMATHESIS_BIN"
            )
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the fuzz run failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // It did run the operations.
    assert!(stdout.contains("/posts/search"), "{stdout}");
    Ok(())
}

#[tokio::test]
async fn admin_routes_are_proxied_to_the_admin_listener_for_token_holders_only()
-> anyhow::Result<()> {
    let nats = start_nats().await?;
    let posts = InProcessService::start_command(&nats.url()).await?;
    let dir = tempfile::tempdir()?;
    let query = InProcessService::start_query(&nats.url(), dir.path()).await?;
    let mut cfg = config(
        &posts.base_url,
        &[&query.base_url],
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
    );
    cfg.posts_query_admin_url = Some(e2e_tests::admin_url(dir.path())?);
    let gw = InProcessService::start_gateway(&cfg).await?;
    let http = http_client();
    let shadows = format!(
        "{}/admin/posts-query/projections/post-view/shadows",
        gw.base_url
    );
    let r = Reply::of(http.post(&shadows)).await?;
    r.assert_problem(401, "authorization");
    let r = Reply::of(
        http.post(&shadows)
            .header("authorization", format!("Bearer {}", token("operator"))),
    )
    .await?;
    assert_eq!(r.status, 201, "{r:?}");
    assert!(r.json()["shadow"].is_string(), "{r:?}");
    // No admin URL configured for reports-query, and no such service.
    for path in [
        "/admin/reports-query/projections/author-stats/shadows",
        "/admin/nope/x",
    ] {
        let r = Reply::of(
            http.post(format!("{}{path}", gw.base_url))
                .header("authorization", format!("Bearer {}", token("operator"))),
        )
        .await?;
        r.assert_problem(404, "no admin url");
    }
    Ok(())
}
