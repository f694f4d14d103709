//! `wharf rekey`: a running host seals every stored value again with its
//! current encryption key, so a previous key can be retired.

use anyhow::{Context as _, Result, bail};

use super::client::AdminArgs;

#[derive(clap::Args, Debug)]
pub struct RekeyArgs {
    /// A bucket to rekey (repeat for more) [default: every bucket a
    /// deployed service names].
    #[arg(long = "bucket", value_name = "BUCKET")]
    buckets: Vec<String>,
    #[command(flatten)]
    admin: AdminArgs,
}

/// Asks the host to rekey, and prints what it did per bucket. Fails if a
/// value did not open with any key the host has (left as it was).
pub async fn run(args: RekeyArgs) -> Result<()> {
    let client = args.admin.client()?;
    let answer = client
        .rekey(&args.buckets)
        .await
        .context("rekeying the host's values")?;
    let mut unopened = 0;
    for bucket in answer["buckets"].as_array().into_iter().flatten() {
        let count = |field: &str| bucket[field].as_u64().unwrap_or(0);
        unopened += count("unopened");
        println!(
            "{}: {} keys, {} sealed again, {} already current, {} do not open{}",
            bucket["bucket"].as_str().unwrap_or("?"),
            count("keys"),
            count("resealed"),
            count("current"),
            count("unopened"),
            match bucket["unopened_keys"].as_array() {
                Some(keys) if !keys.is_empty() => format!(
                    " (e.g. {})",
                    keys.iter()
                        .filter_map(|key| key.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => String::new(),
            }
        );
    }
    let any_bucket: Vec<&str> = answer["any_bucket_services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|name| name.as_str())
        .collect();
    if !any_bucket.is_empty() && args.buckets.is_empty() {
        eprintln!(
            "note: {} may open any bucket (\"*\"): name the buckets they use with --bucket",
            any_bucket.join(", ")
        );
    }
    if unopened > 0 {
        bail!(
            "{unopened} values do not open with any key this host has and were left as they are: keep their key under [encryption] previous"
        );
    }
    Ok(())
}
