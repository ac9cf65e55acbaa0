"""Request bodies checked against Compute Engine's own description of its API: the compute v1
discovery document that google-api-python-client ships, plus the documented rules it cannot
express. The fake Compute Engine (fake_gce.py) refuses, as the API does with HTTP 400, any body
these checks refuse."""

import functools
import json
import re
from importlib import resources

# RFC 1035 labels: what every Compute Engine resource name must be.
NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_INTEGER_FORMATS = {"int64", "uint64"}  # JSON strings on the wire (numbers accepted too)


class Invalid(ValueError):
    """A request body the API would refuse with 400 (`reason` as the API names it)."""

    def __init__(self, message, reason="invalid"):
        super().__init__(message)
        self.reason = reason


@functools.lru_cache(maxsize=None)
def document():
    path = resources.files("googleapiclient").joinpath("discovery_cache", "documents", "compute.v1.json")
    return json.loads(path.read_text())


def method(resource, name):
    return document()["resources"][resource]["methods"][name]


def check_body(method_id, schema_name, body):
    """Refuse a request body of method `method_id` (e.g. compute.instances.insert) whose fields,
    types, enums or required fields do not match the schema `schema_name`, or whose resource
    name is not an RFC 1035 label."""
    _check(method_id, {"$ref": schema_name}, body, schema_name[:1].lower() + schema_name[1:])
    name = body.get("name")
    if name is not None and not NAME.fullmatch(name):
        raise Invalid(f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                      "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")


def _check(method_id, schema, value, where):
    schemas = document()["schemas"]
    if "$ref" in schema:
        schema = schemas[schema["$ref"]]
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            raise Invalid(f"Invalid value at '{where}': expected an object")
        properties = schema.get("properties")
        if properties is None:  # a map: labels and kin
            for key, item in value.items():
                _check(method_id, schema.get("additionalProperties", {}), item, f"{where}[{key}]")
            return
        for key, item in value.items():
            if key not in properties:
                raise Invalid(f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': "
                              "Cannot find field.")
            _check(method_id, properties[key], item, f"{where}.{key}")
        for key, spec in properties.items():
            if method_id in spec.get("annotations", {}).get("required", []) and key not in value:
                raise Invalid(f"Required field '{where}.{key}' not specified", reason="required")
    elif kind == "array":
        if not isinstance(value, list):
            raise Invalid(f"Invalid value at '{where}': expected a list")
        for index, item in enumerate(value):
            _check(method_id, schema["items"], item, f"{where}[{index}]")
    elif kind == "string":
        if schema.get("format") in _INTEGER_FORMATS:
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str)
                                                                          and re.fullmatch(r"-?\d+", value))):
                raise Invalid(f"Invalid value at '{where}' ({schema['format']}): {value!r}")
        elif not isinstance(value, str):
            raise Invalid(f"Invalid value at '{where}' (TYPE_STRING): {value!r}")
        if "enum" in schema and value not in schema["enum"]:
            raise Invalid(f"Invalid value at '{where}': {value!r} is not one of {', '.join(schema['enum'])}")
    elif kind == "integer":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
            raise Invalid(f"Invalid value at '{where}' (TYPE_INT32): {value!r}")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"Invalid value at '{where}' (TYPE_DOUBLE): {value!r}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise Invalid(f"Invalid value at '{where}' (TYPE_BOOL): {value!r}")


# ---------------------------------------------------------------- the documented rules beyond the schema

_URL = r"(?:https://(?:www|compute)\.googleapis\.com/compute/v1/)?"
ZONAL_DISK_TYPE = re.compile(_URL + r"(?:projects/[^/]+/)?zones/([^/]+)/diskTypes/([a-z0-9-]+)")
ZONAL_MACHINE_TYPE = re.compile(_URL + r"(?:projects/[^/]+/)?zones/([^/]+)/machineTypes/([a-z0-9-]+)")
BARE = re.compile(r"[a-z0-9-]+")


def check_instance_properties(properties, *, single_instance, zone):
    """Disk type and machine type forms (a single instance takes `zones/ZONE/...` URLs; an
    instance template takes bare names: its `machineType` as a URL is an INTERNAL_ERROR).
    Returns the machine type's bare name."""
    field = "resource.machineType" if single_instance else "resource.properties.machineType"
    machine_type = properties["machineType"]
    if single_instance:
        found = ZONAL_MACHINE_TYPE.fullmatch(machine_type)
        if not found or found.group(1) != zone:
            raise Invalid(f"Invalid value for field '{field}': '{machine_type}'. "
                          "Machine type must be a URL of the form zones/ZONE/machineTypes/TYPE in the VM's zone.")
        machine_type = found.group(2)
    elif not BARE.fullmatch(machine_type):
        raise Invalid("Internal error. Please try again or contact Google Support.", reason="backendError")
    for index, disk in enumerate(properties.get("disks", [])):
        disk_type = disk.get("initializeParams", {}).get("diskType")
        if disk_type is None:
            continue
        where = f"{'resource' if single_instance else 'resource.properties'}.disks[{index}].initializeParams.diskType"
        found = ZONAL_DISK_TYPE.fullmatch(disk_type)
        if single_instance and not (found and found.group(1) == zone):
            raise Invalid(f"Invalid value for field '{where}': '{disk_type}'. The URL is malformed.")
        if not single_instance and not BARE.fullmatch(disk_type):
            raise Invalid(f"Invalid value for field '{where}': '{disk_type}'. The disk type of an instance "
                          "template must be a name such as pd-balanced.")
    return machine_type
