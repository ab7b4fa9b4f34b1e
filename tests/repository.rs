//! The repository holds only its own files: no symbolic link, which could point at a folder of
//! whatever machine it was committed on.

use std::path::{Path, PathBuf};

fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a folder of the repository") {
        let entry = entry.expect("read a folder entry");
        let name = entry.file_name();
        if name == ".git" || name == "target" {
            continue;
        }
        let kind = entry.file_type().expect("read an entry's type");
        if kind.is_symlink() {
            found.push(entry.path());
        } else if kind.is_dir() {
            walk(&entry.path(), found);
        }
    }
}

#[test]
fn no_symbolic_links_in_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    walk(root, &mut found);
    assert!(
        found.is_empty(),
        "symbolic links in the repository: {found:?}"
    );
}
