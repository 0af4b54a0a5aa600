//! The `ivnet` command line: parse, load the configuration, call the library, map errors to an
//! exit code. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use ivnet::backend;
use ivnet::backend::server_client::ServerSession;
use ivnet::config::{AgentArgs, AgentConfig, BackendChoice, ServerArgs};

/// An Ethernet segment between VMs and processes on one host, carried in shared memory.
///
/// Every member maps one shared region (QEMU's ivshmem device in a VM, or a shared file on the
/// host); `ivnet agent` gives it a TAP interface (`tap-shm`) that behaves like a NIC on a LAN.
#[derive(Parser)]
#[command(name = "ivnet", version, propagate_version = true)]
struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a segment with a TAP interface and move frames until SIGINT/SIGTERM (needs root or
    /// CAP_NET_ADMIN).
    ///
    /// Example: ivnet agent --shm /dev/shm/ivnet --size 64M --address 10.0.0.1/24
    Agent(AgentArgs),
    /// Run the doorbell server for QEMU's ivshmem-doorbell devices and `ivnet agent --socket`:
    /// creates the region, assigns peer ids and hands out eventfds (QEMU's ivshmem-server
    /// protocol). Runs in the foreground.
    ///
    /// Example: ivnet server --socket /run/ivnet.sock --shm /dev/shm/ivnet --size 64M
    Server(ServerArgs),
    /// Be a host on a segment without privileges or a TAP (smoltcp): ping, echo servers, TCP
    /// throughput tests, and forwarding a host port to a service on the segment. The common
    /// options come before the tool.
    ///
    /// Example: ivnet stack --shm /dev/shm/ivnet --ip 10.0.0.2/24 ping 10.0.0.1 -c 3
    Stack(ivnet::stack::cli::StackArgs),
    /// Show a segment's members, rings and counters, from the local agent or a region file.
    ///
    /// The header, every peer (state, MAC, IP addresses, incarnation, heartbeat age), ring fill
    /// and counters. By default it asks the local agent (its control socket,
    /// /run/ivnet/tap-shm.sock), which works in a VFIO guest too; --shm or --device read a
    /// region directly (only read access needed).
    ///
    /// Example: ivnet status --watch     ivnet status --shm /dev/shm/ivnet --format prometheus
    Status(ivnet::status_cmd::StatusArgs),
    /// Write the man page and shell completions (bash, zsh, fish) into DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => {
            let cfg = AgentConfig::from_args(&args)?;
            match &cfg.backend {
                BackendChoice::File { path, size } => {
                    let region = backend::file::attach(path, *size, &cfg.geometry)?;
                    ivnet::agent::run(region, &cfg, None, None)?;
                }
                BackendChoice::Pci { spec, bind } => {
                    let m = backend::open_pci(spec, *bind, &cfg.geometry, cfg.spin)?;
                    log::info!("using the ivshmem device through {}", m.backend);
                    ivnet::agent::run(m.region, &cfg, m.assigned_id, m.wakeups)?;
                }
                BackendChoice::Server { socket } => {
                    let (slot, region, wakeups) =
                        ServerSession::join(socket, &cfg.geometry, cfg.spin)?;
                    ivnet::agent::run(region, &cfg, Some(slot), Some(wakeups))?;
                }
            }
            Ok(())
        }
        Command::Server(args) => {
            let cfg = args.to_config()?;
            ivnet::server::Server::bind(cfg)?.run()?;
            Ok(())
        }
        Command::Stack(args) => {
            ivnet::stack::cli::run(&args)?;
            Ok(())
        }
        Command::Status(args) => ivnet::status_cmd::run(&args),
        Command::GenerateDocs { dir } => {
            use clap::CommandFactory;
            ivnet::docs::generate(Cli::command(), &dir)
                .with_context(|| format!("writing docs into {}", dir.display()))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line for the error, then each cause that the lines above do not already say.
            let mut said = e.to_string();
            eprintln!("ivnet: error: {said}");
            for cause in e.chain().skip(1) {
                let text = cause.to_string();
                if !said.contains(&text) {
                    eprintln!("  caused by: {text}");
                    said.push_str(&text);
                }
            }
            ExitCode::FAILURE
        }
    }
}
