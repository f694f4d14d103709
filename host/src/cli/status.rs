//! `wharf status`: a running host's services — generation, requests/s,
//! errors, in-flight requests and the last deploy's result.

use std::time::Duration;

use anyhow::Result;

use super::client::{AdminArgs, render_status};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Seconds over which requests/s is measured.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    window: f64,
    /// Print the host's service list as JSON instead.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    admin: AdminArgs,
}

/// Prints the host's services, as a table or as JSON.
pub async fn run(args: StatusArgs) -> Result<()> {
    let client = args.admin.client()?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&client.services().await?)?
        );
        return Ok(());
    }
    anyhow::ensure!(
        args.window.is_finite() && (0.0..=60.0).contains(&args.window),
        "--window: give 0 to 60 seconds"
    );
    let services = client.status(Duration::from_secs_f64(args.window)).await?;
    print!("{}", render_status(&services));
    Ok(())
}
