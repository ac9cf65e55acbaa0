"""Talking to Compute Engine through google-cloud-compute (DESIGN §6).

Every change is an `*_unary` call followed by our own wait on its operation through a
Zone/GlobalOperationsClient built with the same endpoint and credentials: an ExtendedOperation's
`.result()` polls through a client that ignores client_options, which would leave a test's fake
endpoint for the real one. Create and delete are idempotent (409 on create and 404 on delete
are success); 429, 5xx and rate-limit refusals are retried with backoff; quota and permission
refusals become one ProviderError naming the quota or the role.

A managed group's insert operation ends before its VMs exist; `wait_for_group` watches the group's
listManagedInstances and listErrors until its first VM runs, or until the cloud says why none can
(quota, stockout, a machine type the zone lacks): GroupCannotRun, one line naming the cause."""

import json
import logging
import os
import re
import time

import tenacity

from ...errors import ProviderError
from ..base import CAPACITY

log = logging.getLogger("sdm_peer.gce")

ENDPOINT_ENV = "SDM_GCE_API_ENDPOINT"  # set: plain HTTP to this host:port, anonymous credentials
RETRY_SECONDS = 300.0  # how long a transient refusal is retried before it is an error
RETRY_MAX_WAIT = 30.0
OPERATION_TIMEOUT = 900.0  # a managed group of large VMs can take minutes
TRANSIENT_REASONS = {"rateLimitExceeded", "userRateLimitExceeded"}  # a 403 that is worth waiting out
QUOTA_CODES = {"QUOTA_EXCEEDED", "quotaExceeded"}
# A zone out of capacity: not a quota anyone can raise.
STOCKOUT_CODES = {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"}
GROUP_POLL_SECONDS = (0.5, 10.0)  # first and longest pause between looks at a new group

# The predefined role that carries a missing permission, by the permission's resource type.
# Creating a firewall rule takes compute.firewalls.create and compute.networks.updatePolicy,
# both in Compute Security Admin (not in Instance Admin).
ROLE_FOR = {
    "compute.firewalls": "roles/compute.securityAdmin",
    "compute.networks.updatePolicy": "roles/compute.securityAdmin",
    "iam.serviceAccounts": "roles/iam.serviceAccountUser",
}
DEFAULT_ROLE = "roles/compute.instanceAdmin.v1"


QUOTA, MACHINE_TYPE = "quota", "machine_type"  # and base.CAPACITY


class GroupCannotRun(ProviderError):
    """The cloud reports why a managed group cannot make its VMs (one line naming the cause);
    `cause`: QUOTA, CAPACITY (the zone is out of it: another zone may have it), MACHINE_TYPE,
    or None."""

    def __init__(self, message, hint=None, cause=None):
        super().__init__(message, hint=hint)
        self.cause = cause


class ComputeApi:
    """The few Compute Engine calls sdm-peer makes, for one project and zone."""

    def __init__(self, project, zone, *, endpoint=None, retry_seconds=RETRY_SECONDS, retry_wait=(1.0, RETRY_MAX_WAIT)):
        try:
            from google.cloud import compute_v1
        except ImportError:
            raise ProviderError("the gce provider needs google-cloud-compute",
                                hint="pip install 'sdm-peer[gce]'") from None
        self.project, self.zone = project, zone
        self.retry_seconds, self.retry_wait = retry_seconds, retry_wait
        self.compute = compute_v1
        options = self._client_options(endpoint or os.environ.get(ENDPOINT_ENV))
        try:
            self.templates = compute_v1.InstanceTemplatesClient(**options)
            self.groups = compute_v1.InstanceGroupManagersClient(**options)
            self.instances = compute_v1.InstancesClient(**options)
            self.firewalls = compute_v1.FirewallsClient(**options)
            self.zone_operations = compute_v1.ZoneOperationsClient(**options)
            self.global_operations = compute_v1.GlobalOperationsClient(**options)
            self.regions = compute_v1.RegionsClient(**options)
            self.projects = compute_v1.ProjectsClient(**options)
        except Exception as exc:  # google.auth's DefaultCredentialsError and kin
            raise ProviderError(f"cannot use Compute Engine: {exc}",
                                hint="run `gcloud auth application-default login`") from None

    @staticmethod
    def _client_options(endpoint):
        if not endpoint:
            return {}  # the default endpoint, Application Default Credentials
        from google.auth.credentials import AnonymousCredentials

        url = endpoint if "://" in endpoint else f"http://{endpoint}"
        return {"credentials": AnonymousCredentials(), "client_options": {"api_endpoint": url}}

    # ------------------------------------------------------------ the calls

    def quotas(self, region):
        """{metric: quotas.Quota} of the region (`regions.get`) and the project (`projects.get`)."""
        from google.api_core import exceptions

        from .quotas import Quota

        found = {}
        for where, what, method, request in (
                ("the project", "reading the project's quotas", self.projects.get, {}),
                (f"region {region}", f"reading the quotas of region {region}", self.regions.get, {"region": region})):
            try:
                resource = self._retrying(what, method, project=self.project, **request)
            except exceptions.GoogleAPICallError as exc:
                raise provider_error(exc, what) from None
            found.update((quota.metric, Quota(quota.metric, quota.limit, quota.usage, where))
                         for quota in resource.quotas)
        return found

    def insert_template(self, body):
        return self._insert("instance template", body["name"], self.templates.insert_unary,
                            instance_template_resource=self.compute.InstanceTemplate.from_json(json.dumps(body)))

    def delete_template(self, name):
        return self._delete("instance template", name, self.templates.delete_unary, instance_template=name)

    # The calls on a managed group take its zone (default: the api's).

    def insert_group(self, body, zone=None):
        return self._insert("managed instance group", body["name"], self.groups.insert_unary, zone=zone or self.zone,
                            instance_group_manager_resource=self.compute.InstanceGroupManager.from_json(
                                json.dumps(body)))

    def delete_group(self, name, zone=None):
        return self._delete("managed instance group", name, self.groups.delete_unary, zone=zone or self.zone,
                            instance_group_manager=name)

    def wait_for_group(self, name, timeout, zone=None):
        """Return once a VM of the managed group runs; GroupCannotRun as soon as the group
        reports an error creating one; ProviderError if none runs within `timeout` seconds."""
        from google.api_core import exceptions

        zone = zone or self.zone
        what = f"waiting for managed instance group {name}"
        running = self.compute.ManagedInstance.InstanceStatus.RUNNING.name  # the VM's status, not a config's
        deadline = time.monotonic() + timeout
        pause, longest = GROUP_POLL_SECONDS
        while True:
            try:
                members = list(self._retrying(what, self.groups.list_managed_instances, project=self.project,
                                              zone=zone, instance_group_manager=name))
                if any(member.instance_status == running for member in members):
                    return
                errors = [(error.code, error.message) for member in members
                          for error in member.last_attempt.errors.errors]
                if not errors:
                    errors = [(item.error.code, item.error.message) for item in self._retrying(
                        what, self.groups.list_errors, project=self.project, zone=zone,
                        instance_group_manager=name)]
            except exceptions.GoogleAPICallError as exc:
                raise provider_error(exc, what) from None
            if errors:
                raise group_error(name, zone, *errors[-1])
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProviderError(f"managed instance group {name}: no VM running after {timeout:.0f}s, "
                                    "and no error reported", hint=f"see: gcloud compute instance-groups managed "
                                                                 f"list-instances {name} --zone {zone}")
            time.sleep(min(pause, left))
            pause = min(pause * 2, longest)

    def delete_instances(self, group, names, zone=None):
        """Remove VMs from a managed group; its target size drops by as many (a missing group, or a
        VM no longer in it, is fine)."""
        zone = zone or self.zone
        request = self.compute.InstanceGroupManagersDeleteInstancesRequest(
            instances=[f"zones/{zone}/instances/{name}" for name in names],
            skip_instances_on_validation_error=True)
        return self._delete(f"VM(s) {', '.join(names)} of managed instance group", group,
                            self.groups.delete_instances_unary, zone=zone, instance_group_manager=group,
                            instance_group_managers_delete_instances_request_resource=request)

    def insert_instance(self, body):
        return self._insert("VM", body["name"], self.instances.insert_unary, zone=self.zone,
                            instance_resource=self.compute.Instance.from_json(json.dumps(body)))

    def delete_instance(self, name):
        return self._delete("VM", name, self.instances.delete_unary, zone=self.zone, instance=name)

    def instance_exists(self, name):
        """True if the VM exists (in any state), False if there is no such VM."""
        from google.api_core import exceptions

        what = f"looking up VM {name}"
        try:
            self._retrying(what, self.instances.get, project=self.project, zone=self.zone, instance=name)
        except exceptions.NotFound:
            return False
        except exceptions.GoogleAPICallError as exc:
            raise provider_error(exc, what) from None
        return True

    def group_names(self, prefix, zone=None):
        """The names of the zone's managed instance groups that start with `prefix`."""
        return self._names("listing managed instance groups", self.groups.list,
                           self.compute.ListInstanceGroupManagersRequest, prefix, zone=zone or self.zone)

    def template_names(self, prefix):
        """The names of the project's instance templates that start with `prefix`."""
        return self._names("listing instance templates", self.templates.list,
                           self.compute.ListInstanceTemplatesRequest, prefix)

    def _names(self, what, method, request_type, prefix, **where):
        from google.api_core import exceptions

        request = request_type(project=self.project, filter=name_filter(prefix), **where)
        try:
            return {item.name for item in self._retrying(what, method, request=request)}
        except exceptions.GoogleAPICallError as exc:
            raise provider_error(exc, what) from None

    def insert_firewall(self, body):
        return self._insert("firewall rule", body["name"], self.firewalls.insert_unary,
                            firewall_resource=self.compute.Firewall.from_json(json.dumps(body)))

    def delete_firewall(self, name):
        return self._delete("firewall rule", name, self.firewalls.delete_unary, firewall=name)

    # ------------------------------------------------------------ insert, delete, wait

    def _insert(self, kind, name, method, **request):
        """Create; True if created, False if it existed already."""
        from google.api_core import exceptions

        return self._change(f"creating {kind} {name}", method, exceptions.Conflict, "RESOURCE_ALREADY_EXISTS",
                            **request)

    def _delete(self, kind, name, method, **request):
        """Delete; True if deleted, False if there was nothing to delete."""
        from google.api_core import exceptions

        return self._change(f"deleting {kind} {name}", method, exceptions.NotFound, "RESOURCE_NOT_FOUND", **request)

    def _change(self, what, method, done_already, tolerated, **request):
        """One create or delete and its operation: True if it did its work, False if it was done
        already (the call refused with `done_already`, or the operation failed with `tolerated`)."""
        from google.api_core import exceptions

        try:
            operation = self._retrying(what, method, project=self.project, **request)
        except done_already:
            log.info("%s: done already", what)
            return False
        except exceptions.GoogleAPICallError as exc:
            raise provider_error(exc, what) from None
        return self._wait(operation, what, tolerated=tolerated)

    def _wait(self, operation, what, *, tolerated):
        """Wait for an operation through our own operations clients (same endpoint); True if it
        did its work, False if it found the tolerated condition (exists / already gone)."""
        from google.api_core import exceptions

        done = self.compute.Operation.Status.DONE
        deadline = time.monotonic() + OPERATION_TIMEOUT
        while operation.status != done:
            if time.monotonic() > deadline:
                raise ProviderError(f"{what}: operation {operation.name} not done after {OPERATION_TIMEOUT:.0f}s")
            try:
                if operation.zone:
                    operation = self._retrying(what, self.zone_operations.wait, project=self.project,
                                               zone=operation.zone.rpartition("/")[2], operation=operation.name)
                else:
                    operation = self._retrying(what, self.global_operations.wait, project=self.project,
                                               operation=operation.name)
            except exceptions.GoogleAPICallError as exc:
                raise provider_error(exc, what) from None
        errors = [{"code": error.code, "message": error.message} for error in operation.error.errors]
        if errors and all(error["code"] == tolerated for error in errors):
            return False
        if errors:
            raise operation_error(errors, what)
        return True

    def _retrying(self, what, method, **request):
        from google.auth.exceptions import GoogleAuthError

        first, longest = self.retry_wait
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient), reraise=True,
            wait=tenacity.wait_random_exponential(multiplier=first, max=longest),
            stop=tenacity.stop_after_delay(self.retry_seconds),
            before_sleep=lambda state: log.warning("%s: %s; retrying", what, state.outcome.exception()))
        try:
            return retrying(method, **request)
        except GoogleAuthError as exc:  # no token for the credentials (on a VM: from the metadata server)
            raise ProviderError(f"{what}: cannot authenticate ({exc})",
                                hint="run `gcloud auth application-default login`, or check the VM's "
                                     "service account") from None


class DryRunApi:
    """Prints every call ComputeApi would make, changes nothing, needs no credentials."""

    def __init__(self, project, zone, echo=print):
        self.project, self.zone, self.echo = project, zone, echo

    def _show(self, verb, path, body=None):
        line = f"{verb} /compute/v1/projects/{self.project}/{path}"
        self.echo(line + (" " + json.dumps(redacted(body), sort_keys=True) if body is not None else ""))
        return True

    def insert_template(self, body):
        return self._show("POST", "global/instanceTemplates", body)

    def delete_template(self, name):
        return self._show("DELETE", f"global/instanceTemplates/{name}")

    def insert_group(self, body, zone=None):
        return self._show("POST", f"zones/{zone or self.zone}/instanceGroupManagers", body)

    def delete_group(self, name, zone=None):
        return self._show("DELETE", f"zones/{zone or self.zone}/instanceGroupManagers/{name}")

    def delete_instances(self, group, names, zone=None):
        zone = zone or self.zone
        return self._show("POST", f"zones/{zone}/instanceGroupManagers/{group}/deleteInstances",
                          {"instances": [f"zones/{zone}/instances/{name}" for name in names],
                           "skipInstancesOnValidationError": True})

    def wait_for_group(self, name, timeout, zone=None):
        self.echo(f"would wait up to {timeout:.0f}s for a VM of {name} to run")

    def insert_instance(self, body):
        return self._show("POST", f"zones/{self.zone}/instances", body)

    def delete_instance(self, name):
        return self._show("DELETE", f"zones/{self.zone}/instances/{name}")

    def group_names(self, prefix, zone=None):
        """Not known without asking: None (every config's group is then deleted by name)."""
        self._show("GET", f"zones/{zone or self.zone}/instanceGroupManagers?filter={name_filter(prefix)}")
        return None

    def template_names(self, prefix):
        self._show("GET", f"global/instanceTemplates?filter={name_filter(prefix)}")
        return None

    def insert_firewall(self, body):
        return self._show("POST", "global/firewalls", body)

    def delete_firewall(self, name):
        return self._show("DELETE", f"global/firewalls/{name}")


def name_filter(prefix):
    """A list filter for names starting with `prefix`: an RE2 matched whole. Our names hold only
    lowercase letters, digits and `-`, none of which needs escaping."""
    return f'name eq "{prefix}.*"'


def redacted(body):
    """A request body fit to print: the token hidden, cloud-configs and scripts summarised."""
    if isinstance(body, dict):
        if "key" in body and "value" in body:
            value = body["value"]
            if body["key"] == "sdm-token":
                value = "<token>"
            elif "\n" in value:
                value = f"<{body['key']}: {value.count(chr(10))} lines>"
            return {**body, "value": value}
        return {key: redacted(value) for key, value in body.items()}
    if isinstance(body, list):
        return [redacted(item) for item in body]
    return body


# ---------------------------------------------------------------- errors

def _reasons(exc):
    return {error.get("reason") for error in getattr(exc, "errors", None) or [] if isinstance(error, dict)}


def is_transient(exc):
    """Worth retrying: throttling, server errors, a connection that failed."""
    from google.api_core import exceptions
    from google.auth.exceptions import TransportError
    from requests.exceptions import ConnectionError as RequestsConnectionError, Timeout

    if isinstance(exc, (exceptions.TooManyRequests, exceptions.ServerError, TransportError, RequestsConnectionError,
                        Timeout)):
        return True
    return isinstance(exc, exceptions.Forbidden) and bool(_reasons(exc) & TRANSIENT_REASONS)


def _quota_error(message, what):
    quota = re.search(r"Quota '([^']+)'", message)
    named = f"quota {quota.group(1)}" if quota else "a quota"
    return ProviderError(f"{what}: {named} exceeded ({message})",
                         hint="raise it under IAM & Admin > Quotas (or use smaller groups), "
                              "then `sdm-peer group up CONFIG`")


def _stockout_error(message, what):
    return ProviderError(f"{what}: the zone is out of capacity for these VMs ({message})",
                         hint="try another zone (--set zone=...) or a smaller machine family, or try again later")


def group_error(name, zone, code, message):
    """GroupCannotRun naming why the group's VMs cannot be made: the quota metric, limit and
    region; the zone out of capacity; the machine type missing in the zone; else the API's own."""
    quota = re.search(r"Quota '([^']+)' exceeded\.\s+Limit: ([\d.]+) in region ([\w-]+)", message)
    missing = re.search(r"[Mm]achine type with name '([^']+)' does not exist in zone '([^']+)'", message)
    kind = None
    if code in QUOTA_CODES or quota:
        kind, cause = QUOTA, (f"quota {quota.group(1)} exceeded (limit {float(quota.group(2)):g} in region "
                              f"{quota.group(3)})" if quota else f"a quota exceeded ({message})")
        hint = "raise it under IAM & Admin > Quotas (or use smaller groups), then `sdm-peer group up CONFIG`"
    elif code in STOCKOUT_CODES:
        kind, cause = CAPACITY, f"zone {zone} is out of capacity for its machine type ({code})"
        hint = "try another zone of the region (--set zones=...: tried in order when one runs out), or try again later"
    elif missing:
        kind, cause = MACHINE_TYPE, f"machine type {missing.group(1)} does not exist in zone {missing.group(2)}"
        hint = "choose another machine_family or zone"
    else:
        cause = f"{code}: {message}"
        hint = f"see: gcloud compute instance-groups managed list-errors {name} --zone {zone}"
    return GroupCannotRun(f"managed instance group {name} cannot make VMs: {cause}", hint=hint, cause=kind)


def _permission_error(message, what):
    permission = re.search(r"'?\b((?:compute|iam|storage)\.[A-Za-z]+\.[A-Za-z]+)\b", message)
    if permission is None:
        return ProviderError(f"{what}: permission denied ({message})",
                             hint=f"grant the account {DEFAULT_ROLE} on the project")
    name = permission.group(1)
    role = ROLE_FOR.get(name) or ROLE_FOR.get(name.rsplit(".", 1)[0], DEFAULT_ROLE)
    return ProviderError(f"{what}: permission {name} denied; the account needs the role {role}",
                         hint=f"gcloud projects add-iam-policy-binding PROJECT --member=ACCOUNT --role={role}")


def provider_error(exc, what):
    """One clear ProviderError for a refusal of a Compute Engine call."""
    from google.api_core import exceptions

    # The client puts "METHOD URL: " before Compute Engine's own message.
    message = re.sub(r"^[A-Z]+ \S+: ", "", getattr(exc, "message", None) or str(exc))
    if _reasons(exc) & STOCKOUT_CODES:
        return _stockout_error(message, what)
    if _reasons(exc) & QUOTA_CODES or "Quota '" in message:
        return _quota_error(message, what)
    if isinstance(exc, exceptions.Forbidden):
        return _permission_error(message, what)
    if isinstance(exc, exceptions.Unauthorized):
        return ProviderError(f"{what}: not authenticated ({message})",
                             hint="run `gcloud auth application-default login`")
    if is_transient(exc):
        return ProviderError(f"{what}: Compute Engine still refused after retrying for a while ({message})")
    return ProviderError(f"{what}: {message}")


def operation_error(errors, what):
    """A ProviderError for an operation that finished with errors."""
    for error in errors:
        if error["code"] in STOCKOUT_CODES:
            return _stockout_error(error["message"], what)
        if error["code"] in QUOTA_CODES:
            return _quota_error(error["message"], what)
        if error["code"] in ("PERMISSION_DENIED", "FORBIDDEN"):
            return _permission_error(error["message"], what)
    return ProviderError(f"{what}: " + "; ".join(f"{error['code']}: {error['message']}" for error in errors))
