//! Local development helper used by `scripts/demo`:
//! `agenthome-dev create-table --endpoint http://127.0.0.1:PORT --name TABLE`
//! creates the user→machine table in a DynamoDB-compatible server from the
//! one table definition (`agenthome::store::table`); `create-journal-table`
//! the lifecycle journal's (`agenthome::journal::table`).

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match args.first().map(String::as_str) {
        Some(command @ ("create-table" | "create-journal-table")) => {
            let (Some(endpoint), Some(name)) = (value("--endpoint"), value("--name")) else {
                eprintln!("usage: agenthome-dev {command} --endpoint URL --name TABLE");
                return ExitCode::from(2);
            };
            if !(endpoint.starts_with("http://127.") || endpoint.starts_with("http://localhost")) {
                eprintln!("refusing a non-loopback endpoint: {endpoint}");
                return ExitCode::from(2);
            }
            let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                    "local", "local", None, None, "static",
                ))
                .endpoint_url(&endpoint)
                .load()
                .await;
            let client = aws_sdk_dynamodb::Client::new(&config);
            let created = if command == "create-table" {
                agenthome::store::create_table(&client, &name).await
            } else {
                agenthome::journal::table::create_table(&client, &name).await
            };
            match created {
                Ok(()) => {
                    println!("table {name} ready");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cannot create table {name}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!(
                "usage: agenthome-dev create-table|create-journal-table --endpoint URL --name TABLE"
            );
            ExitCode::from(2)
        }
    }
}
