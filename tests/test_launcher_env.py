"""Distributed environment parsing: torchrun variables, SLURM variables, host lists, bad values."""
import pytest

from launcher.env import DistEnv, EnvError, expand_hostlist, port_from_job_id, read_dist_env


def test_plain_process_is_single():
    assert read_dist_env({}) == DistEnv()


def test_torchrun_variables():
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                         "MASTER_ADDR": "node7", "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    assert env == DistEnv(3, 8, 1, 2, "node7", 1234, "torchrun")  # torchrun wins over the surrounding srun


def test_slurm_task_variables():
    env = read_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
                         "SLURM_JOB_NODELIST": "gpu[03-06]", "SLURM_TASKS_PER_NODE": "2(x4)"})
    assert env == DistEnv(5, 8, 1, 2, "gpu03", port_from_job_id(123456), "slurm")
    assert 20000 <= env.master_port < 40000


@pytest.mark.parametrize("spec, hosts", [
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("node1", ["node1"]),
    ("a[8-10],b", ["a8", "a9", "a10", "b"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x[009-011]-ib,login", ["x009-ib", "x010-ib", "x011-ib", "login"]),
])
def test_hostlist_expansion(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("environ, needle", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2: must be in [0, WORLD_SIZE=2)"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "environment variable RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, "MASTER_PORT=70000: must be a TCP port"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST is not set"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[01-"}, "unbalanced '['"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[05-02]"}, "bad range '05-02'"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}, "SLURM_PROCID=4: must be in [0, "),
])
def test_bad_values_name_the_variable(environ, needle):
    with pytest.raises(EnvError) as e:
        read_dist_env(environ)
    assert needle in str(e.value)
