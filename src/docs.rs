//! The man page and shell completions, generated from the command line's definition
//! (`ivnet generate-docs DIR`, a hidden subcommand that `scripts/package.sh` runs before
//! `cargo deb`), so they never drift from `--help`.

use std::fs;
use std::io;
use std::path::Path;

use clap_complete::Shell;

/// Writes into `dir`: `ivnet.1` (and `ivnet-SUBCOMMAND.1` for each visible subcommand), and
/// completions `ivnet.bash`, `_ivnet` (zsh) and `ivnet.fish`.
pub fn generate(mut cmd: clap::Command, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    cmd.build();
    let man = |c: &clap::Command, name: &str| -> io::Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(c.clone()).title(name.to_uppercase()).render(&mut out)?;
        fs::write(dir.join(format!("{name}.1")), out)
    };
    man(&cmd, "ivnet")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let name = format!("ivnet-{}", sub.get_name());
        man(&sub.clone().display_name(name.clone()), &name)?;
    }
    for (shell, file) in
        [(Shell::Bash, "ivnet.bash"), (Shell::Zsh, "_ivnet"), (Shell::Fish, "ivnet.fish")]
    {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, "ivnet", &mut out);
        fs::write(dir.join(file), out)?;
    }
    Ok(())
}
