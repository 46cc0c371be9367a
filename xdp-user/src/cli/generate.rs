//! `xdplb __generate DIR` (packaging): man pages, completions and the configuration reference.

use std::path::Path;

use anyhow::{Context as _, Result};

use super::*;

/// Man pages (`xdplb(8)` and one per subcommand, `xdplb-vip-add(8)`...)
/// and bash, zsh and fish completions, all from the clap definitions.
pub(super) fn generate(out: &Path) -> Result<()> {
    use clap::CommandFactory as _;
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // No `help` subcommand: it has no page, so none may list or link it
    // (`xdplb help` and `--help` still work; this tree only renders).
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    /// The page of `cmd` (named by its `path` of command words) and of
    /// each of its subcommands.
    fn pages(cmd: &clap::Command, path: &[&str], dir: &Path, written: &mut usize) -> Result<()> {
        // Hidden commands get no page (the tree has no `help` command).
        if cmd.is_hide_set() {
            return Ok(());
        }
        let name = path.join("-");
        // The synopsis reads as typed (`xdplb check-config`).
        let page = cmd.clone().name(name.clone()).bin_name(path.join(" "));
        let mut text = Vec::new();
        clap_mangen::Man::new(page)
            .section("8")
            .render(&mut text)
            .context("rendering a man page")?;
        let file = dir.join(format!("{name}.8"));
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        *written += 1;
        for sub in cmd.get_subcommands() {
            let mut sub_path = path.to_vec();
            sub_path.push(sub.get_name());
            pages(sub, &sub_path, dir, written)?;
        }
        Ok(())
    }
    let mut written = 0;
    pages(&cmd, &["xdplb"], &man, &mut written)?;
    // xdplb.toml(5) and the README's reference, from one table.
    let page = man.join("xdplb.toml.5");
    std::fs::write(&page, crate::config::reference::man_page())
        .with_context(|| format!("writing {}", page.display()))?;
    written += 1;
    let reference = out.join("config-reference.md");
    std::fs::write(&reference, crate::config::reference::markdown())
        .with_context(|| format!("writing {}", reference.display()))?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "xdplb.bash"),
        (clap_complete::Shell::Zsh, "_xdplb"),
        (clap_complete::Shell::Fish, "xdplb.fish"),
    ] {
        let path = completions.join(file);
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
        clap_complete::generate(shell, &mut cmd, "xdplb", &mut f);
    }
    println!(
        "{written} man pages in {}, completions in {}",
        man.display(),
        completions.display()
    );
    Ok(())
}
