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
                         "SLURM_JOB_NODELIST": "gpu[03-06]", "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_NODEID": "2",
                         "SLURM_STEP_ID": "0"})
    assert env == DistEnv(5, 8, 1, 2, "gpu03", port_from_job_id(123456), "slurm")
    assert 20000 <= env.master_port < 40000


# what SLURM 22.05 sets in a job of 2 nodes x 2 tasks (recorded on the test cluster of test_slurm.py): the batch
# script has the job's variables and SLURM_PROCID=0, but no step id
BATCH_SCRIPT = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NODELIST": "node[1-2]",
                "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "2"}
SRUN_TASK_3 = {**BATCH_SCRIPT, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0",
               "SLURM_STEPID": "0", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_STEP_NUM_TASKS": "4",
               "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


@pytest.mark.parametrize("step", [None, "batch", "extern", "4294967294", "4294967295", ""])
def test_the_batch_script_is_no_srun_task(step):
    environ = dict(BATCH_SCRIPT) if step is None else {**BATCH_SCRIPT, "SLURM_STEP_ID": step}
    assert read_dist_env(environ) == DistEnv()  # not rank 0 of 4 waiting for 3 ranks that never start


def test_srun_task_of_a_two_node_job():
    assert read_dist_env(SRUN_TASK_3) == DistEnv(3, 4, 1, 2, "node1", port_from_job_id(7), "slurm")
    old_name = {k: v for k, v in SRUN_TASK_3.items() if k != "SLURM_STEP_ID"}  # SLURM < 21.08: SLURM_STEPID only
    assert read_dist_env(old_name) == read_dist_env(SRUN_TASK_3)


@pytest.mark.parametrize("node, procid, local, tasks_here", [(0, 0, 1, 2), (2, 5, 1, 2), (3, 6, 0, 1)])
def test_uneven_nodes_count_the_tasks_of_this_node(node, procid, local, tasks_here):
    environ = {**SRUN_TASK_3, "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NODELIST": "n[1-4]", "SLURM_NTASKS": "7",
               "SLURM_STEP_NUM_TASKS": "7", "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
               "SLURM_NODEID": str(node), "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(local)}
    env = read_dist_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (procid, 7, local, tasks_here)


def test_a_step_smaller_than_the_job_is_its_own_world():
    environ = {**SRUN_TASK_3, "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "node2",
               "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
    env = read_dist_env(environ)
    assert (env.world_size, env.local_world_size, env.master_addr) == (2, 1, "node2")


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
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, "SLURM_JOB_NODELIST is not set"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[01-"},
     "unbalanced '['"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[05-02]"},
     "bad range '05-02'"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n1"},
     "SLURM_PROCID=4: must be in [0, "),
    ({**SRUN_TASK_3, "SLURM_STEP_TASKS_PER_NODE": "2(x2"}, "SLURM_STEP_TASKS_PER_NODE='2(x2': expected e.g."),
    ({**SRUN_TASK_3, "SLURM_NODEID": "2"}, "SLURM_NODEID=2: must be in [0, 2), the nodes listed in "
                                           "SLURM_STEP_TASKS_PER_NODE='2(x2)'"),
    ({**SRUN_TASK_3, "SLURM_LOCALID": "2"}, "SLURM_LOCALID=2: must be in [0, local world size 2)"),
])
def test_bad_values_name_the_variable(environ, needle):
    with pytest.raises(EnvError) as e:
        read_dist_env(environ)
    assert needle in str(e.value)
