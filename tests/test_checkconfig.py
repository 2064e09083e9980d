"""`buildbot checkconfig` on the shipped example and on bad input, as an operator runs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.harness import REPO, Master

pytestmark = pytest.mark.integration

BAD_WORKERS = {
    # worker name: (keyword arguments, expected fragment of the error)
    "shell": ("image='org/worker;rm -rf /'", "'image: ", "shell-active characters"),
    "subst": ("image='org/worker:$(id)'", "'image: ", "shell-active"),
    "upper": ("image='Org/Worker:1'", "'image: ", "not a valid Docker image reference"),
    "spacepw": ("image='org/w:1', password='two words'", "'password: ", "whitespace"),
    "badami": ("image='org/w:1', ami='ami-xyz', ami_filters=None", "'ami: ", "is not an AMI id"),
    "bothami": ("image='org/w:1', ami='ami-0123456789abcdef0'", "'ami: ", "exactly one of"),
    "noimage": ("", "'image: ", "is required"),
    "awstag": ("image='org/w:1', tags={'aws:x': '1'}", "'tags: ", "reserved by AWS"),
    "nametag": ("image='org/w:1', tags={'Name': 'x'}", "'tags: ", "set by the plugin"),
    "badmaster": ("image='org/w:1', master_address='nohost'", "'master_address: ", "host:port"),
    "bigdata": ("image='org/w:1', setup_repo='https://x/' + 'a' * 17000",
                "'user data: ", "EC2 allows at most 16384"),
    "newline": ("image='org/w:1', setup_repo='https://x/\\nrm'", "'setup_repo: ", "whitespace"),
    "badtype": ("image='org/w:1', instance_type='large'", "'instance_type: ", "instance type"),
    "isol": ("image='org/w:1', isolation='vm'", "'isolation: ", "is not one of"),
    "grp": ("image='org/w:1', instance_group='g'", "'instance_group: ", "only with"),
    "limkey": ("image='org/w:1', container_limits={'memroy': '6g'}", "'container_limits: ",
               "unknown key 'memroy' (known: memory, pids, cpus)"),
    "limmem": ("image='org/w:1', container_limits={'memory': '6 gigs'}", "'container_limits: ",
               "memory: '6 gigs' is not a size"),
    "limpids": ("image='org/w:1', container_limits={'pids': 0}", "'container_limits: ",
                "pids: 0 must be positive"),
    "limcpus": ("image='org/w:1', container_limits={'cpus': -1}", "'container_limits: ",
                "cpus: -1 must be positive"),
    "limtype": ("image='org/w:1', container_limits='6g'", "'container_limits: ",
                "must be a dict such as"),
    "imds": ("image='org/w:1', metadata_options={'HttpTokens': 'maybe'}", "'metadata_options: ",
             "HttpTokens"),
    # Wrong types and ranges that used to fail later, in a loop (issue 9).
    "kpint": ("image='org/w:1', keypair_name=5", "'keypair_name: ", "must be a string"),
    "kpempty": ("image='org/w:1', keypair_name=''", "'keypair_name: ", "1-255 printable"),
    "profint": ("image='org/w:1', instance_profile=5", "'instance_profile: ", "must be a string"),
    "profbad": ("image='org/w:1', instance_profile='a b'", "'instance_profile: ",
                "not an instance profile"),
    "regionint": ("image='org/w:1', region=5", "'region: ", "must be a string"),
    "regionbad": ("image='org/w:1', region='US East'", "'region: ", "not a region name"),
    "urlint": ("image='org/w:1', endpoint_url=5", "'endpoint_url: ", "must be a URL string"),
    "urlftp": ("image='org/w:1', endpoint_url='ftp://x'", "'endpoint_url: ", "http(s)://"),
    "urlport": ("image='org/w:1', endpoint_url='http://h:99999'", "'endpoint_url: ",
                "is not a URL"),
    "session": ("image='org/w:1', session='x'", "'session: ", "boto3.session.Session"),
    "hops": ("image='org/w:1', metadata_options={'HttpPutResponseHopLimit': 'two'}",
             "'metadata_options: ", "HttpPutResponseHopLimit must be a whole number 1-64"),
    "hops0": ("image='org/w:1', metadata_options={'HttpPutResponseHopLimit': 0}",
              "'metadata_options: ", "HttpPutResponseHopLimit"),
    "mdend": ("image='org/w:1', metadata_options={'HttpEndpoint': True}",
              "'metadata_options: ", "HttpEndpoint must be one of enabled, disabled"),
    "mdtags": ("image='org/w:1', metadata_options={'InstanceMetadataTags': 'yes'}",
               "'metadata_options: ", "InstanceMetadataTags"),
    # Graviton and launch templates (issue 20).
    "archami": ("image='org/w:1', ami_filters=None, ami={'arm64': 'ami-0123456789abcdef0'}, "
                "instance_type=['c7g.large', 'c6i.large']", "'ami: ",
                "has no AMI for x86_64, the architecture of instance_type 'c6i.large'"),
    "archkey": ("image='org/w:1', ami_filters=None, ami={'aarch64': 'ami-0123456789abcdef0'}",
                "'ami: ", "is not an EC2 architecture"),
    "noami": ("image='org/w:1', ami_filters=None", "'ami: ", "or a launch_template"),
    "ltstr": ("image='org/w:1', launch_template='ci-workers'", "'launch_template: ",
              "must be a dict like"),
    "ltboth": ("image='org/w:1', launch_template={'LaunchTemplateName': 'ci', "
               "'LaunchTemplateId': 'lt-0123456789abcdef0'}", "'launch_template: ",
               "exactly one of LaunchTemplateName and LaunchTemplateId"),
    "ltver": ("image='org/w:1', launch_template={'LaunchTemplateName': 'ci-workers', "
              "'Version': 'latest'}", "'launch_template: ", "Version must be a version number"),
    "ltkey": ("image='org/w:1', launch_template={'Name': 'ci-workers'}", "'launch_template: ",
              "unknown keys ['Name']"),
    "bwtstr": ("image='org/w:1', build_wait_timeout='x'", "'build_wait_timeout: ",
               "must be a number of seconds >= 0 (or -1: never), not str"),
    "bwtneg": ("image='org/w:1', build_wait_timeout=-5", "'build_wait_timeout: ", "not -5"),
    "misstr": ("image='org/w:1', missing_timeout='x'", "'missing_timeout: ", "not str"),
    "mis0": ("image='org/w:1', missing_timeout=0", "'missing_timeout: ", ">= 1, not 0"),
    "misnone": ("image='org/w:1', missing_timeout=None", "'missing_timeout: ", "not NoneType"),
    "lorstr": ("image='org/w:1', launch_on_request='no'", "'launch_on_request: ",
               "must be True or False"),
    "maxstr": ("image='org/w:1', max_builds='x'", "'max_builds: ", "whole number >= 1, not str"),
    "max0": ("image='org/w:1', max_builds=0", "'max_builds: ", "not 0"),
    "maxbool": ("image='org/w:1', max_builds=True", "'max_builds: ", "not bool"),
    "ciistr": ("image='org/w:1', check_instance_interval='x'", "'check_instance_interval: ",
               "not str"),
    "cii0": ("image='org/w:1', check_instance_interval=0", "'check_instance_interval: ",
             ">= 1, not 0"),
    "ciismall": ("image='org/w:1', check_instance_interval=0.01", "'check_instance_interval: ",
                 "not 0.01"),
    "props": ("image='org/w:1', properties='x'", "'properties: ", "must be a dict"),
    "repoopt": ("image='org/w:1', setup_repo='--upload-pack=touch /tmp/x'", "'setup_repo: ",
                "must not start with '-'"),
    "branchopt": ("image='org/w:1', setup_repo='https://x/r', setup_branch='-b'",
                  "'setup_branch: ", "must not start with '-'"),
    "kprender": ("image='org/w:1', keypair_name=util.Property('kp')", "'keypair_name: ",
                 "cannot be a renderable"),
    "pool": ("image='org/w:1', pool=['p']", "'pool: ", "must be a non-empty name"),
    # A warm minimum by schedule (fleet/schedule.py).
    "warmday": ("image='org/w:1', pool='p', min_warm={'mon-fry 08:00-19:00 UTC': 1}",
                "'min_warm: ", "period 'mon-fry 08:00-19:00 UTC': 'fry' is not a day"),
    "warmzone": ("image='org/w:1', pool='p', min_warm={'mon 08:00-19:00 Europe/Berln': 1}",
                 "'min_warm: ", "'Europe/Berln' is not a time zone this host knows"),
    "warmtime": ("image='org/w:1', pool='p', min_warm={'mon 08:00-25:00 UTC': 1}",
                 "'min_warm: ", "'25:00' is not a time HH:MM"),
    "warmover": ("image='org/w:1', pool='p', min_warm={'mon-fri 08:00-19:00 UTC': 2, "
                 "'fri 18:00-20:00 UTC': 1}", "'min_warm: ", "overlap (both at Fri"),
    "warmnopool": ("image='org/w:1', min_warm=2", "'min_warm: ", "needs pool="),
    "stoppedsched": ("image='org/w:1', max_stopped={'sat 00:00-24:00 UTC': -1}",
                     "'max_stopped: ", "-1 must be a whole number >= 0"),
    "typo": ("image='org/w:1', imagee='org/w:2'", "'imagee: ",
             "unknown setting; did you mean 'image'?"),
    "typo2": ("image='org/w:1', bild_wait_timeout=3", "'bild_wait_timeout: ",
              "did you mean 'build_wait_timeout'?"),
    "junk": ("image='org/w:1', zzz=3", "'zzz: ", "unknown setting"),
    "regscheme": ("image='org/w:1', registry_credentials='vault:ci/registry'",
                  "'registry_credentials: ", "'vault' is not a known scheme; use one of"),
    "regname": ("image='org/w:1', registry_credentials='ssm:/ci/a b'",
                "'registry_credentials: ", "is not a valid ssm name"),
    "regrender": ("image='org/w:1', registry_credentials=util.Property('r')",
                  "'registry_credentials: ", "cannot be a renderable"),
    # Caches and the disk floor (issue 20).
    "cachename": ("image='org/w:1', isolation='container', caches={'C C': '/c'}", "'caches: ",
                  "name 'C C' must be 1-32 characters"),
    "cachepath": ("image='org/w:1', isolation='container', caches={'c': '/usr'}", "'caches: ",
                  "would hide the image's own files"),
    "cacheinst": ("image='org/w:1', isolation='instance', caches={'c': '/cache'}", "'caches: ",
                  "not with isolation='instance'"),
    "cachebuilds": ("image='org/w:1', caches={'c': '/cache'}", "'caches: ",
                    "with isolation='none' needs max_builds=1"),
    "floor": ("image='org/w:1', disk_floor='95%'", "'disk_floor: ",
              "must be a percentage of the disk like '10%' (1-90)"),
    # Drained instances (fleet/retirement.py, issue 21).
    "maxbuilds": ("image='org/w:1', max_builds_per_instance=0", "'max_builds_per_instance: ",
                  "0 must be a whole number >= 1"),
    "maxage": ("image='org/w:1', max_instance_age='1d'", "'max_instance_age: ",
               "'1d' must be seconds > 0"),
}

BAD_CFG = """\
from buildbot.plugins import util, worker
c = BuildmasterConfig = {{}}
c['protocols'] = {{'pb': {{'port': 9989}}}}
base = dict(ami_filters=[{{'Name': 'name', 'Values': ['x-*']}}], instance_type='t3.micro')
c['workers'] = [
{workers}
]
c['builders'] = [util.BuilderConfig(name='b', workernames=[w.name for w in c['workers']],
                 factory=util.BuildFactory())]
"""


@pytest.fixture(scope="module")
def checkconfig_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}


def _master(root: Path, name: str, env: dict[str, str]) -> Master:
    return Master(root, name, env)


def test_example_config_passes(masters_root: Path, checkconfig_env: dict[str, str]) -> None:
    master = _master(masters_root, "example", checkconfig_env)
    shutil.copy(REPO / "master.cfg.example", master.basedir / "master.cfg")
    result = master.checkconfig()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Config file is good" in result.stdout


def test_example_config_passes_without_any_aws_environment(
        masters_root: Path, tmp_path: Path) -> None:
    """As shipped, on a machine where AWS was never configured (no AWS_* variables, no
    ~/.aws): the example names its region."""
    master = _master(masters_root, "example-no-aws", {"HOME": str(tmp_path)})
    master.env = {k: v for k, v in master.env.items() if not k.startswith("AWS_")}
    shutil.copy(REPO / "master.cfg.example", master.basedir / "master.cfg")
    result = master.checkconfig()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Config file is good" in result.stdout


@pytest.fixture(scope="module")
def bad_output(masters_root: Path, checkconfig_env: dict[str, str]) -> str:
    master = _master(masters_root, "bad", checkconfig_env)
    workers = "\n".join(
        f"    worker.DockerAMILatentWorker({name!r}, **{{**base, **dict({kwargs})}}),"
        for name, (kwargs, _, _) in BAD_WORKERS.items()
    )
    master.write_config(BAD_CFG.format(workers=workers))
    result = master.checkconfig()
    assert result.returncode != 0
    return result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(BAD_WORKERS))
def test_bad_setting_is_named_with_worker_and_setting(bad_output: str, name: str) -> None:
    _, setting, message = BAD_WORKERS[name]
    lines = [line for line in bad_output.splitlines()
             if f"DockerAMILatentWorker {name!r}: {setting.strip(chr(39))}" in line]
    assert lines, f"no error naming worker {name!r} and {setting}:\n{bad_output}"
    assert any(message in line for line in lines), lines


def test_missing_region_is_a_config_error(masters_root: Path) -> None:
    master = _master(masters_root, "noregion", {"AWS_CONFIG_FILE": "/nonexistent"})
    for var in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        master.env.pop(var, None)
    master.write_config(BAD_CFG.format(
        workers="    worker.DockerAMILatentWorker('r', image='org/w:1', **base),"))
    result = master.checkconfig()
    assert result.returncode != 0
    assert "DockerAMILatentWorker 'r': region: no AWS region" in result.stdout + result.stderr


def test_example_pool_passes_when_enabled(masters_root: Path,
                                          checkconfig_env: dict[str, str]) -> None:
    master = _master(masters_root, "example-pool", checkconfig_env)
    text = (REPO / "master.cfg.example").read_text()
    enabled = text.replace("# from buildbot_dockerami import worker_pool",
                           "from buildbot_dockerami import worker_pool")
    enabled = enabled.replace("# c['workers'] += worker_pool(", "c['workers'] += worker_pool(")
    assert enabled.count("worker_pool") == 2 and "# c['workers'] +=" not in enabled
    master.write_config(enabled)
    result = master.checkconfig()
    assert result.returncode == 0, result.stdout + result.stderr


def test_pool_with_slots_but_without_container_isolation_is_refused(
        masters_root: Path, checkconfig_env: dict[str, str]) -> None:
    master = _master(masters_root, "bad-pool", checkconfig_env)
    master.write_config(BAD_CFG.format(workers="    *__import__('buildbot_dockerami')"
                                       ".worker_pool('p', slots=2, isolation='instance',"
                                       " image='org/w:1', **base),"))
    result = master.checkconfig()
    assert result.returncode != 0
    assert "worker_pool 'p': slots: several slots need isolation='container'" in (
        result.stdout + result.stderr)


def test_a_pools_bad_schedule_is_named_once(
        masters_root: Path, checkconfig_env: dict[str, str]) -> None:
    master = _master(masters_root, "bad-pool-schedule", checkconfig_env)
    master.write_config(BAD_CFG.format(workers="    *__import__('buildbot_dockerami')"
                                       ".worker_pool('p', count=3, image='org/w:1', min_warm="
                                       "{'mon-fri 08:00-19:00 Europe/Berlin': 4, "
                                       "'sat 7:00-6:00 Nowhere/Zone': 1}, **base),"))
    result = master.checkconfig()
    output = result.stdout + result.stderr
    assert result.returncode != 0
    expected = ("worker_pool 'p': min_warm: period 'sat 7:00-6:00 Nowhere/Zone': "
                "'Nowhere/Zone' is not a time zone this host knows")
    assert output.count(expected) == 1, output


def test_bad_config_output_has_no_traceback(bad_output: str) -> None:
    assert "Traceback" not in bad_output and "error while parsing" not in bad_output, bad_output


#: BAD_CFG plus what a config that passes needs.
SCHEDULER = "from buildbot.plugins import schedulers\n" \
    "c['schedulers'] = [schedulers.ForceScheduler(name='force', builderNames=['b'])]\n"

GOOD_WORKERS = [
    # Legal edge values that must stay accepted, renderables where they are rendered.
    "build_wait_timeout=0", "build_wait_timeout=-1", "build_wait_timeout=0.5",
    "missing_timeout=1", "max_builds=None", "max_builds=3", "check_instance_interval=1",
    "keypair_name='ops'", "instance_profile='buildbot-worker'",
    "instance_profile='arn:aws:iam::123456789012:instance-profile/ci/worker'",
    "region='eu-west-1'", "endpoint_url='http://127.0.0.1:5000'",
    "endpoint_url='https://ec2.us-east-1.amazonaws.com'",
    "session=boto3.session.Session(region_name='us-east-1')",
    "metadata_options={'HttpPutResponseHopLimit': 1, 'HttpEndpoint': 'enabled', "
    "'HttpProtocolIpv6': 'disabled', 'InstanceMetadataTags': 'enabled'}",
    "password=util.Secret('worker-password')", "password='.*'",
    "image=util.Property('image', default='org/w:1')",
    "setup_repo=util.Interpolate('%(prop:repo)s'), setup_branch='main'",
    "setup_repo='https://x/r-1', setup_branch='feature-x'",
    "properties={'a': 1}",
    "pool='p', min_warm={'mon-fri 08:00-19:00 Europe/Berlin': 4, 'sat 10:00-14:00 UTC': 1, "
    "'sun 22:00-01:00 America/New_York': 2, 'default': 0}", "pool='p', min_warm=3",
    "max_stopped={'sat,sun 00:00-24:00 UTC': 0, 'default': 10}",
    "ami_filters=None, launch_template={'LaunchTemplateName': 'ci-workers', "
    "'Version': '$Latest'}",
    "launch_template={'LaunchTemplateId': 'lt-0123456789abcdef0', 'Version': 3}",
    "ami_filters=None, instance_type=['c7g.large', 'c6i.large'], "
    "ami={'arm64': 'ami-0123456789abcdef0', 'x86_64': 'ami-0123456789abcdef1'}",
    "ami_filters=None, instance_type='c7g.large', "
    "ami={'arm64': util.Property('arm_ami', default='ami-0123456789abcdef0')}",
    "container_limits={'memory': '6g', 'pids': 4096, 'cpus': 2}",
    "container_limits={'memory': 536870912, 'cpus': 0.5}", "container_limits={'memory': None}",
    "registry_credentials='ssm:/ci/registry', instance_profile='buildbot-worker'",
    "registry_credentials='secretsmanager:arn:aws:secretsmanager:eu-west-1:123456789012:"
    "secret:ci/registry-AbCdEf', instance_profile='buildbot-worker'",
    "isolation='container', caches={'ccache': '/home/builder/.ccache'}, disk_floor='20G'",
    "caches={'c': '/cache', 'git': '/home/builder/git'}, max_builds=1, idle_action='stop'",
    "disk_floor=2.5", "disk_floor='5%'",
    "max_builds_per_instance=20, max_instance_age=12 * 3600",
]


def test_legal_values_pass(masters_root: Path, checkconfig_env: dict[str, str]) -> None:
    master = _master(masters_root, "good-values", checkconfig_env)
    workers = "\n".join(
        f"    worker.DockerAMILatentWorker('g{i}', **{{**base, 'image': 'org/w:1', **dict({kw})}}),"
        for i, kw in enumerate(GOOD_WORKERS)
    )
    master.write_config("import boto3\n" + BAD_CFG.format(workers=workers) + SCHEDULER)
    result = master.checkconfig()
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_names_and_keywords_are_named_not_a_traceback(
        masters_root: Path, checkconfig_env: dict[str, str]) -> None:
    master = _master(masters_root, "bad-names", checkconfig_env)
    master.write_config(BAD_CFG.format(workers="""
    worker.DockerAMILatentWorker(123, image='org/w:1', **base),
    worker.DockerAMILatentWorker(name=124, image='org/w:1', **base),
    worker.DockerAMILatentWorker(image='org/w:1', **base),
    worker.DockerAMILatentWorker(b'bytes', image='org/w:1', **base),
"""))
    result = master.checkconfig()
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output and "error while parsing" not in output, output
    assert "DockerAMILatentWorker 123: name: must be a string, not int" in output
    assert "DockerAMILatentWorker 124: name: must be a string, not int" in output
    assert "DockerAMILatentWorker None: name: is required" in output
    assert "DockerAMILatentWorker b'bytes': name: must be a string, not bytes" in output


def test_keyword_name_still_works(masters_root: Path, checkconfig_env: dict[str, str]) -> None:
    master = _master(masters_root, "kw-name", checkconfig_env)
    worker = "    worker.DockerAMILatentWorker(name='kw', image='org/w:1', **base),"
    master.write_config(BAD_CFG.format(workers=worker) + SCHEDULER)
    result = master.checkconfig()
    assert result.returncode == 0, result.stdout + result.stderr


def test_password_errors_never_show_the_password(
        masters_root: Path, checkconfig_env: dict[str, str]) -> None:
    master = _master(masters_root, "pw-secret", checkconfig_env)
    master.write_config(BAD_CFG.format(workers="""
    worker.DockerAMILatentWorker('sp', password='Bad Secret 7a6b', image='org/w:1', **base),
    worker.DockerAMILatentWorker('ctl', password='Bad\\x01Secret7a6b', image='org/w:1', **base),
"""))
    result = master.checkconfig()
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "DockerAMILatentWorker 'sp': password: the value contains whitespace" in output
    assert "DockerAMILatentWorker 'ctl': password: the value contains control characters" in output
    assert "Secret" not in output and "7a6b" not in output, output


def test_an_ecr_image_without_an_instance_profile_is_warned_about(
        masters_root: Path, checkconfig_env: dict[str, str]) -> None:
    """The instance pulls from ECR with its role: a warning (not an error) names the
    worker and the setting."""
    master = _master(masters_root, "ecr-warning", checkconfig_env)
    image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/ci/linux:2026-12-01"
    master.write_config(BAD_CFG.format(workers=f"""
    worker.DockerAMILatentWorker('ecr', image={image!r}, **base),
    worker.DockerAMILatentWorker('ecr-ok', image={image!r}, instance_profile='ci', **base),
""") + SCHEDULER)
    result = master.checkconfig()
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert (f"DockerAMILatentWorker 'ecr': instance_profile: image {image!r} is in ECR"
            in output), output
    assert "'ecr-ok': instance_profile" not in output
