//! `rls-relay serve | migrate | check | demo`.

use std::process::ExitCode;

use clap::Parser;
use rls_relay::config::{Cli, Command};
use rls_relay::{db, demo, shutdown, startup, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            telemetry::init(&config.log);
            match startup::Application::build(*config).await {
                Ok(app) => match app.run_until_stopped(shutdown::signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => fail(&error),
                },
                Err(error) => fail(&error),
            }
        }
        Command::Check(config) => {
            telemetry::init(&config.log);
            match startup::audit(&config).await {
                Ok(report) => {
                    for warning in &report.warnings {
                        eprintln!("warning: {warning}");
                    }
                    if report.passed() {
                        println!(
                            "ok: RLS holds for {} ({} tracked table(s): {})",
                            config.visibility.db_role,
                            report.event_tables.len(),
                            report.event_tables.join(", ")
                        );
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("refused:");
                        for finding in &report.findings {
                            eprintln!("  - {finding}");
                        }
                        ExitCode::FAILURE
                    }
                }
                Err(error) => fail(&error),
            }
        }
        Command::Migrate(config) => {
            telemetry::init(&config.log);
            let result = async {
                let mut client =
                    db::connect_once(&config.database, db::POOL_APPLICATION_NAME).await?;
                Ok::<_, Box<dyn std::error::Error>>(db::migrate::run(&mut client).await?)
            }
            .await;
            match result {
                Ok(applied) if applied.is_empty() => {
                    println!("relay schema is up to date");
                    ExitCode::SUCCESS
                }
                Ok(applied) => {
                    println!("applied: {}", applied.join(", "));
                    ExitCode::SUCCESS
                }
                Err(error) => fail(&*error),
            }
        }
        Command::Demo(config) => {
            telemetry::init(&config.log);
            match demo::run(config, shutdown::on_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Prints the error and what caused it ("error performing TLS handshake: invalid peer
/// certificate: UnknownIssuer"), and fails.
fn fail(error: &(dyn std::error::Error + 'static)) -> ExitCode {
    eprintln!("error: {}", rls_relay::errors::Chain(error));
    ExitCode::FAILURE
}
