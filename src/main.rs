//! The `ivnet` command line: parse, load the configuration, call the library, map errors to an
//! exit code. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

use ivnet::backend;
use ivnet::backend::pci::PciError;
use ivnet::backend::server_client::ServerSession;
use ivnet::backend::PciBackendError;
use ivnet::config::{AgentArgs, AgentConfig, BackendChoice, Origin, ServerArgs};

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
    /// Example: ivnet server --socket /run/ivnet/ivnet.sock --shm /dev/shm/ivnet --size 64M
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
        // Warnings, and the one line that says the agent or server is up.
        0 => format!("warn,{}=info", ivnet::NOTICE),
        1 => "info".into(),
        2 => "debug".into(),
        _ => "trace".into(),
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => {
            let cfg = AgentConfig::from_args(&args)?;
            if args.check_config {
                return report_check("agent", &cfg.to_toml(), &ivnet::check::agent(&cfg));
            }
            match &cfg.backend {
                BackendChoice::File { path, size } => {
                    let attached =
                        backend::file::attach_with(path, *size, &cfg.geometry, &cfg.create_mode)?;
                    if let Err(e) = ivnet::agent::run(attached.region.clone(), &cfg, None, None) {
                        // A failed start leaves no file it created behind.
                        attached.discard_if_unused();
                        return Err(e.into());
                    }
                }
                BackendChoice::Pci { spec, bind } => {
                    let m =
                        backend::open_pci(spec, *bind, &cfg.geometry, cfg.spin).map_err(|e| {
                            // The VM's configuration file used on a host: say where the choice is.
                            match (&e, cfg.origin("device")) {
                                (
                                    PciBackendError::Pci(PciError::NotFound),
                                    Origin::File { path, line },
                                ) => anyhow::Error::new(e).context(format!(
                                    "{} line {line} chooses the ivshmem device (device = ...), \
                                     which exists only in a VM: on a host give --socket PATH or \
                                     --shm PATH (either replaces it), or use a host configuration",
                                    path.display()
                                )),
                                _ => e.into(),
                            }
                        })?;
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
            if args.check_config {
                return report_check("server", &args.to_toml(&cfg), &ivnet::check::server(&cfg));
            }
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

/// `--check-config`: the effective configuration and the findings on stdout (as a TOML file
/// with comments); an error if there are problems.
fn report_check(what: &str, config: &str, findings: &ivnet::check::Findings) -> anyhow::Result<()> {
    println!("# ivnet {what} --check-config: the effective configuration (a flag wins over the");
    println!("# configuration file, the file over the default), then what the checks found.");
    print!("{config}{}", findings.to_comments());
    match findings.problems.len() {
        0 => {
            println!("# no problems found");
            Ok(())
        }
        n => anyhow::bail!(
            "{n} problem{} found (the `# problem:` lines above)",
            if n == 1 { "" } else { "s" }
        ),
    }
}

/// `ivnet stack ping 10.0.0.1 --ip ...`: clap would suggest `-- --ip`; the fix is to move the
/// option before the tool. Returns that error if `err` is this case.
fn misplaced_stack_option(err: &clap::Error, argv: &[String]) -> Option<clap::Error> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if err.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else { return None };
    let name = arg.split('=').next().unwrap_or(arg);
    let mut cmd = Cli::command();
    cmd.build();
    let stack = cmd.find_subcommand_mut("stack")?;
    let is_stack_option = stack.get_arguments().any(|a| {
        a.get_long().is_some_and(|l| name.strip_prefix("--") == Some(l))
            || a.get_short()
                .is_some_and(|c| name.len() == 2 && name.strip_prefix('-') == Some(&c.to_string()))
    });
    let at = argv.iter().position(|a| a == "stack")?;
    let tools: Vec<String> = stack.get_subcommands().map(|t| t.get_name().to_string()).collect();
    let tool = argv[at + 1..].iter().find(|a| tools.contains(a))?;
    if !is_stack_option {
        return None;
    }
    Some(stack.error(
        ErrorKind::UnknownArgument,
        format!(
            "{name} is an option of `ivnet stack`, not of its tool `{tool}`: put the options \
             before the tool, e.g. `ivnet stack --shm /dev/shm/ivnet --ip 10.0.0.9/24 {tool} ...`"
        ),
    ))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => match misplaced_stack_option(&e, &argv) {
            Some(better) => better.exit(),
            None => e.exit(),
        },
    };
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
