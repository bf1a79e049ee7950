import re
from pathlib import Path

from pbkd_mpi.config import render_job_docs


REPO = Path(__file__).resolve().parents[1]


def test_job_file_reference_is_up_to_date():
    assert (REPO / "docs" / "job-file.md").read_text() == render_job_docs(), (
        "regenerate with: python -m pbkd_mpi.config > docs/job-file.md")


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme
    commands = re.findall(r"```\n(pip install [^\n]+)\n```", readme)
    assert len(commands) == 2 and ci in commands
    assert any("mpirun -np 3 python -m pbkd_mpi" in c for c in commands)


def test_slurm_scripts_are_valid_bash():
    import subprocess

    scripts = sorted((REPO / "slurm").glob("*.sbatch"))
    assert scripts
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        assert "#SBATCH --ntasks" in script.read_text()
