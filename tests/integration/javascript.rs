//! A JavaScript developer's first day, as a newcomer from Node.js + Express
//! has it: `wharf new`, `npm install` of real packages (axios, hono, zod),
//! state and messages through the project's own `wharf/` module, errors that
//! say what to do, a Node built-in refused at build time, and `wharf dev`
//! rebuilding on save — with no file copied by hand.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::commands::{build_step, new_project, stderr, stdout};
use crate::support::{ServiceDir, TestServer, WharfProcess, client, eventually, get};

const PATIENCE: Duration = Duration::from_secs(120);

/// `npm install PACKAGES…` in `project` (the template's own packages when
/// none are named).
fn npm_install(project: &Path, packages: &[&str]) {
    let mut args = vec!["install", "--no-audit", "--no-fund", "--prefer-offline"];
    args.extend_from_slice(packages);
    build_step(project, "npm", &args, None);
}

/// `npm run build` in `project`; its output, whether it built or not.
fn npm_build(project: &Path) -> (bool, String) {
    let output = std::process::Command::new("npm")
        .args(["run", "build"])
        .current_dir(project)
        .output()
        .expect("run npm");
    (
        output.status.success(),
        format!("{}{}", stdout(&output), stderr(&output)),
    )
}

/// Uncomments `line` (its text after "# ") in `file`.
fn uncomment(file: &Path, line: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    let commented = format!("# {line}");
    assert!(
        text.contains(&commented),
        "{commented:?} in {}",
        file.display()
    );
    std::fs::write(file, text.replacen(&commented, line, 1)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newcomer_serves_npm_packages_state_and_messages_without_copying_a_file() {
    // The shop: Hono for routes, zod for validation, axios for calling
    // another service, the template's module for state and messages.
    let (_shop_parent, shop) = new_project("shop", "js");
    npm_install(&shop, &[]);
    npm_install(&shop, &["axios@1.13.2", "hono@4.10.7", "zod@4.1.13"]);
    std::fs::write(
        shop.join("index.js"),
        r#"import { Hono } from 'hono';
import { z } from 'zod';
import axios from 'axios';
import { serve, kv, publish } from './wharf/index.js';

const Order = z.object({ item: z.string(), qty: z.number().int().positive() });
const app = new Hono();

app.post('/orders', async (c) => {
  const parsed = Order.safeParse(await c.req.json());
  if (!parsed.success) return c.json({ error: parsed.error.issues[0].message }, 400);
  const order = kv.open('shop').increment('orders');
  await publish('shop.ordered', { order, ...parsed.data });
  const audit = await axios.get('http://audit.internal/');
  return c.json({ order, audited: audit.data.audited });
});
app.get('/not-mine', () => kv.open('payroll').get('x'));
serve(app.fetch);
"#,
    )
    .unwrap();
    let manifest = shop.join("shop.toml");
    uncomment(&manifest, "[outbound]");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace(
            "# allow = [\"https://api.example.com\", \"http://users.internal\"]",
            "allow = [\"http://audit.internal\"]",
        ),
    )
    .unwrap();
    let (built, output) = npm_build(&shop);
    assert!(built, "{output}");

    // The audit: another template service, triggered by the shop's topic.
    let (_audit_parent, audit) = new_project("audit", "js");
    npm_install(&audit, &[]);
    std::fs::write(
        audit.join("index.js"),
        r#"import { serve, kv } from './wharf/index.js';

serve(async (request) => {
  const { pathname } = new URL(request.url);
  const bucket = kv.open('audit');
  if (request.method === 'POST' && pathname === '/on-order') {
    console.log(`audited ${await request.text()}`);
    return { audited: bucket.increment('orders') };
  }
  return { audited: Number(bucket.get('orders') ?? 0) };
});
"#,
    )
    .unwrap();
    let manifest = audit.join("audit.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace(
            "# subscribe = [\"orders.created\"]",
            "subscribe = [\"shop.ordered\"]",
        )
        .replace("# [[trigger.message]]", "[[trigger.message]]")
        .replace("# topic = \"orders.created\"", "topic = \"shop.ordered\"")
        .replace("# path = \"/on-order\"", "path = \"/on-order\""),
    )
    .unwrap();
    let (built, output) = npm_build(&audit);
    assert!(built, "{output}");

    let services = ServiceDir::new();
    for (project, name) in [(&shop, "shop"), (&audit, "audit")] {
        services.write(
            &format!("{name}.toml"),
            &std::fs::read(project.join(format!("{name}.toml"))).unwrap(),
        );
        services.install_bytes(
            &format!("{name}.wasm"),
            &std::fs::read(project.join(format!("{name}.wasm"))).unwrap(),
        );
    }
    let server = TestServer::for_dir(&services).await;
    let order = |body: &'static str| {
        let url = server.url("/shop/orders");
        async move {
            let response = client().post(url).body(body).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    let (status, body) = order(r#"{"item":"tea","qty":2}"#).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["order"], 1, "{body}");
    let (status, body) = order(r#"{"item":"tea","qty":-1}"#).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("expected number to be >0"), "{body}");
    // The message reached the audit service through its trigger.
    eventually(PATIENCE, "the order audited", || {
        let url = server.url("/audit/");
        async move {
            get(&url)
                .await
                .is_some_and(|(_, body)| body.contains("\"audited\":1"))
        }
    })
    .await;
    // A bucket the manifest does not grant: a 500 that shows nothing in
    // production, and a reason naming the grant to add.
    let (status, body) = get(&server.url("/shop/not-mine")).await.unwrap();
    assert_eq!((status, body.as_str()), (500, "Internal Server Error"));
    server.stop().await;

    // A Node built-in with no browser stand-in fails the build, naming it.
    std::fs::write(
        shop.join("index.js"),
        "import { readFileSync } from 'node:fs';\nimport { serve } from './wharf/index.js';\nserve(() => readFileSync('/etc/hostname', 'utf8'));\n",
    )
    .unwrap();
    let (built, output) = npm_build(&shop);
    assert!(!built);
    assert!(
        output.contains("\"node:fs\" is a Node.js built-in module (imported by index.js)"),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wharf_dev_rebuilds_on_save_and_shows_the_services_log_and_errors() {
    let (_parent, project) = new_project("devsvc", "js");
    npm_install(&project, &[]);
    let dev = WharfProcess::start_announcing("wharf dev: listening on ", |command| {
        command
            .current_dir(&project)
            .args(["dev", "--listen", "127.0.0.1:0"]);
    });
    let (status, body) = get(&dev.url("/devsvc/")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Hello from devsvc!"), "{body}");

    // Save a change: a new greeting, a log line, and a route that throws.
    let index = project.join("index.js");
    let text = std::fs::read_to_string(&index).unwrap();
    let text = text
        .replace(
            "const greeting = () => env.GREETING ?? 'Hello';",
            "const greeting = () => {\n  console.log('greeting asked');\n  return 'Howdy';\n};\nfunction broken() {\n  throw new Error('kaboom');\n}",
        )
        .replace("const routes = {", "const routes = {\n  'GET /boom': () => broken(),");
    std::fs::write(&index, text).unwrap();
    eventually(PATIENCE, "the rebuilt service", || {
        let url = dev.url("/devsvc/");
        async move {
            get(&url)
                .await
                .is_some_and(|(_, body)| body.contains("Howdy from devsvc!"))
        }
    })
    .await;
    dev.wait_for_log_line(&["greeting asked", "devsvc"], PATIENCE)
        .await;
    // In development the 500 says what broke, and where in index.js.
    let (status, body) = get(&dev.url("/devsvc/boom")).await.unwrap();
    assert_eq!(status, 500);
    assert!(body.contains("Error: kaboom"), "{body}");
    assert!(body.contains("broken@index.js:"), "{body}");
    dev.wait_for_log_line(&["broken@index.js:"], PATIENCE).await;

    // A broken save keeps the last good version serving.
    std::fs::write(&index, "this is not javascript(").unwrap();
    dev.wait_for_log_line(&["the build failed"], PATIENCE).await;
    let (status, body) = get(&dev.url("/devsvc/")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Howdy"), "{body}");
}
