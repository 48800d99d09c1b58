# Coder template: one Proxmox VE container per workspace, running an
# agent-native Hakim image (hakim-init as PID 1 starts the Coder agent from
# CODER_AGENT_URL and CODER_AGENT_TOKEN). Walk-through: docs/proxmox.md.
#
# Needs Proxmox VE 9.1+ (`env`, host-managed NICs; OCI images on the OCI
# route) and an API token allowed to download templates into
# `template_datastore` and to create containers (docs/proxmox.md, "Coder
# template").
#
# Two routes, chosen by `route`; on both the agent connects on the first build:
# - "rootfs" (default): the node downloads a rootfs template from the release
#   the templates workflow published (`template_release_url`, `template_file`,
#   checked against `template_sha256` from that release's sha256sums.txt), or
#   uses one uploaded beforehand (`rootfs_template`). Proxmox keeps the `env`
#   given at creation, so the provider's `environment_variables` reach PID 1
#   on the first start, and every later build rewrites them and restarts.
# - "oci": the node pulls `image` (an OCI application container). Proxmox
#   replaces the `env` given at creation with the image's Env, so the
#   container is created stopped and pve-oci-env.sh, run on every build, sets
#   `env` through the API and starts it (stops it on a stop build). Needs `sh`
#   and `curl` where Terraform runs (Coder's provisioner image has both).
#
# The template's own files (this one and pve-oci-env.sh) must be pushed
# together: `coder templates push` sends the whole directory.

terraform {
  # terraform_data.
  required_version = ">= 1.4"
  required_providers {
    coder = {
      source  = "coder/coder"
      version = ">= 2.0"
    }
    proxmox = {
      source = "bpg/proxmox"
      # proxmox_download_file (the short name of
      # proxmox_virtual_environment_download_file), proxmox_oci_image,
      # environment_variables and host_managed.
      version = ">= 0.111.0"
    }
  }
}

variable "proxmox_endpoint" {
  type        = string
  description = "Proxmox VE API URL, e.g. https://pve.example.com:8006/"
}

variable "proxmox_api_token" {
  type        = string
  sensitive   = true
  description = "API token as USER@REALM!TOKENID=SECRET"
}

variable "proxmox_insecure" {
  type        = bool
  default     = false
  description = "Skip TLS verification of the API (self-signed node certificates)"
}

variable "proxmox_ca_file" {
  type        = string
  default     = ""
  description = "OCI route: CA bundle (a path where Terraform runs) pve-oci-env.sh verifies the API with; empty: the system's"
}

variable "node_name" {
  type        = string
  default     = "pve"
  description = "Node the workspaces run on"
}

variable "template_datastore" {
  type        = string
  default     = "local"
  description = "Storage with the 'vztmpl' content type, where downloaded templates and pulled images land"
}

variable "rootfs_datastore" {
  type        = string
  default     = "local-lvm"
  description = "Storage for the containers' root disks"
}

variable "bridge" {
  type        = string
  default     = "vmbr0"
  description = "Bridge with a DHCP server on its network"
}

variable "route" {
  type        = string
  default     = "rootfs"
  description = "rootfs: a rootfs template (downloaded from the release, or rootfs_template); oci: the node pulls `image`"
  validation {
    condition     = contains(["rootfs", "oci"], var.route)
    error_message = "route is \"rootfs\" or \"oci\"."
  }
}

variable "template_release_url" {
  type        = string
  default     = ""
  description = "Release of the templates workflow holding template_file, e.g. https://github.com/OWNER/REPO/releases/download/templates-20261125-42 (a variant that did not change stays in the release that last converted it)"
}

variable "template_file" {
  type        = string
  default     = "hakim-base-trixie-amd64.tar.zst"
  description = "Artifact in that release"
}

variable "template_sha256" {
  type        = string
  default     = ""
  description = "sha256 of template_file, from the release's sha256sums.txt: curl -fsSL RELEASE/sha256sums.txt | awk -v f=FILE '$2 == f { print $1 }'"
  validation {
    condition     = var.template_sha256 == "" || can(regex("^[0-9a-f]{64}$", var.template_sha256))
    error_message = "template_sha256 is 64 lowercase hex digits (the first column of sha256sums.txt)."
  }
}

variable "rootfs_template" {
  type        = string
  default     = ""
  description = "rootfs route: an uploaded template's volume id, e.g. local:vztmpl/hakim-base-trixie-amd64.tar.zst, used instead of downloading (one copy for every workspace)"
}

variable "image" {
  type        = string
  default     = ""
  description = "oci route: agent-native image with a tag, e.g. ghcr.io/OWNER/hakim-base:agent-native (images/agent-native or hakim-convert --inject-init --push)"
}

provider "coder" {}

provider "proxmox" {
  endpoint  = var.proxmox_endpoint
  api_token = var.proxmox_api_token
  insecure  = var.proxmox_insecure
}

data "coder_workspace" "me" {}

data "coder_workspace_owner" "me" {}

data "coder_parameter" "cores" {
  name         = "cores"
  display_name = "CPU cores"
  type         = "number"
  default      = "2"
  mutable      = true
  validation {
    min = 1
    max = 16
  }
}

data "coder_parameter" "memory" {
  name         = "memory"
  display_name = "Memory (MiB)"
  type         = "number"
  default      = "4096"
  mutable      = true
  validation {
    min = 1024
    max = 65536
  }
}

data "coder_parameter" "disk" {
  name         = "disk"
  display_name = "Root disk (GB)"
  description  = "Holds the image, the home directory and Docker's data: size it for all three."
  type         = "number"
  default      = "32"
  mutable      = false
  validation {
    min = 8
    max = 512
  }
}

locals {
  # Container host names must be DNS labels.
  hostname = substr(lower(replace("${data.coder_workspace_owner.me.name}-${data.coder_workspace.me.name}", "/[^a-zA-Z0-9-]/", "-")), 0, 63)
  oci      = var.route == "oci"
  download = !local.oci && var.rootfs_template == ""
  # One file per workspace, so workspaces never delete or overwrite each
  # other's (deleting a workspace deletes its file).
  template_name = "coder-${data.coder_workspace.me.id}-${var.template_file}"

  # What hakim-init reads (docs/init.md). The token changes with every build.
  workspace_env = {
    CODER_AGENT_URL     = data.coder_workspace.me.access_url
    CODER_AGENT_TOKEN   = coder_agent.main.token
    CODER_USER          = "coder"
    START_DOCKER_DAEMON = "1"
    START_XVFB          = "0"
  }

  vm_id = one(concat(
    proxmox_virtual_environment_container.workspace[*].vm_id,
    proxmox_virtual_environment_container.workspace_oci[*].vm_id,
  ))
  container_id = one(concat(
    proxmox_virtual_environment_container.workspace[*].id,
    proxmox_virtual_environment_container.workspace_oci[*].id,
  ))
}

resource "coder_agent" "main" {
  os   = "linux"
  arch = "amd64"
  # hakim-init downloads the agent from the access URL and runs it: the
  # agent's init_script is not used.
  startup_script_behavior = "non-blocking"
  startup_script          = <<-EOT
    mkdir -p "$HOME/project"
  EOT

  display_apps {
    vscode                 = true
    web_terminal           = true
    ssh_helper             = true
    port_forwarding_helper = true
  }

  metadata {
    key          = "load"
    display_name = "Load average"
    script       = "cut -d' ' -f1-3 /proc/loadavg"
    interval     = 30
    timeout      = 1
  }

  metadata {
    key          = "disk"
    display_name = "Root disk"
    script       = "df -h --output=used,size / | tail -n 1"
    interval     = 300
    timeout      = 5
  }
}

# rootfs route: the node downloads the template from the release (the API's
# download-url) and checks it against the release's sha256sums.txt.
resource "proxmox_download_file" "template" {
  count              = local.download ? 1 : 0
  node_name          = var.node_name
  datastore_id       = var.template_datastore
  content_type       = "vztmpl"
  url                = "${trimsuffix(var.template_release_url, "/")}/${var.template_file}"
  checksum           = var.template_sha256
  checksum_algorithm = "sha256"
  file_name          = local.template_name
  upload_timeout     = 1800
  # Release assets never change: no size check against the URL on each build.
  overwrite = false

  lifecycle {
    precondition {
      condition     = var.template_release_url != "" && var.template_sha256 != ""
      error_message = "The rootfs route downloads template_file from template_release_url and checks template_sha256: set both (or rootfs_template)."
    }
  }
}

# oci route: the node pulls the image itself (skopeo copy to an OCI archive).
resource "proxmox_oci_image" "hakim" {
  count          = local.oci ? 1 : 0
  node_name      = var.node_name
  datastore_id   = var.template_datastore
  reference      = var.image
  file_name      = "hakim-${data.coder_workspace.me.id}.tar"
  upload_timeout = 1800

  lifecycle {
    precondition {
      condition     = can(regex(":[^/]+$", var.image))
      error_message = "The oci route pulls `image`, which needs a :tag (no @digest)."
    }
  }
}

# rootfs route. The container outlives a stop (the home directory is on its
# root disk); Coder's stop transition only shuts it down. Keep in step with
# workspace_oci below: only `count`, `started`, `environment_variables`,
# `operating_system.template_file_id` and `lifecycle` differ.
resource "proxmox_virtual_environment_container" "workspace" {
  count       = local.oci ? 0 : 1
  node_name   = var.node_name
  description = "Coder workspace ${data.coder_workspace_owner.me.name}/${data.coder_workspace.me.name}"
  tags        = ["coder", "hakim"]

  started       = data.coder_workspace.me.start_count == 1
  start_on_boot = false

  # Ids are shifted on the host; the image's ids (coder = 1000) stay below 65536.
  unprivileged = true
  features {
    # Docker inside the workspace. Unprivileged Docker may also want
    # keyctl = true, which only root@pam (not an API token) may set.
    nesting = true
  }

  cpu {
    cores = data.coder_parameter.cores.value
  }

  memory {
    dedicated = data.coder_parameter.memory.value
    swap      = 0
  }

  disk {
    datastore_id = var.rootfs_datastore
    size         = data.coder_parameter.disk.value
  }

  operating_system {
    template_file_id = local.download ? proxmox_download_file.template[0].id : var.rootfs_template
    # Hakim images are Debian: Proxmox keeps hostname and /etc/hosts right.
    type = "debian"
  }

  # hakim-init logs to /dev/console, and no getty runs on a tty.
  console {
    type = "console"
  }

  initialization {
    hostname = local.hostname
    ip_config {
      ipv4 {
        address = "dhcp"
      }
    }
  }

  # No DHCP client runs inside: the host runs one in the container's network
  # namespace and writes /etc/resolv.conf. Set explicitly, since the provider
  # would otherwise send host-managed=0.
  network_interface {
    name         = "eth0"
    bridge       = var.bridge
    host_managed = true
  }

  # Kept by Proxmox at creation on this route, so the first start has them. A
  # change (every build: a new token) is written and the container restarted.
  environment_variables = local.workspace_env

  lifecycle {
    # A new template must not replace (and so wipe) existing workspaces;
    # rebuild a workspace deliberately to move it to a new one.
    ignore_changes = [operating_system[0].template_file_id]
  }
}

# oci route: created stopped, never started by the provider; `env` and the
# run state belong to terraform_data.oci_env (pve-oci-env.sh).
resource "proxmox_virtual_environment_container" "workspace_oci" {
  count       = local.oci ? 1 : 0
  node_name   = var.node_name
  description = "Coder workspace ${data.coder_workspace_owner.me.name}/${data.coder_workspace.me.name}"
  tags        = ["coder", "hakim"]

  # Proxmox would replace the env given at creation with the image's: start
  # only once pve-oci-env.sh has set it.
  started       = false
  start_on_boot = false

  # Ids are shifted on the host; the image's ids (coder = 1000) stay below
  # 65536. Proxmox refuses privileged containers from OCI images.
  unprivileged = true
  features {
    nesting = true
  }

  cpu {
    cores = data.coder_parameter.cores.value
  }

  memory {
    dedicated = data.coder_parameter.memory.value
    swap      = 0
  }

  disk {
    datastore_id = var.rootfs_datastore
    size         = data.coder_parameter.disk.value
  }

  operating_system {
    template_file_id = proxmox_oci_image.hakim[0].id
    type             = "debian"
  }

  # Proxmox sets this for OCI images anyway; saying it keeps the provider
  # from switching it back to "tty".
  console {
    type = "console"
  }

  initialization {
    hostname = local.hostname
    ip_config {
      ipv4 {
        address = "dhcp"
      }
    }
  }

  network_interface {
    name         = "eth0"
    bridge       = var.bridge
    host_managed = true
  }

  lifecycle {
    # `started`: the script starts and stops the container. `env`: the
    # script writes it; the provider would otherwise delete it (and print the
    # old token in the plan). A new image must not replace the container.
    ignore_changes = [
      started,
      environment_variables,
      operating_system[0].template_file_id,
    ]
  }
}

# oci route, every build (the agent token is new each time): start → shut down
# if running with another env, PUT env (the image's Env + local.workspace_env),
# start; stop → shut down. Secrets travel in `environment` only: never in
# `command`, never printed (Terraform also suppresses the output).
resource "terraform_data" "oci_env" {
  count = local.oci ? 1 : 0
  triggers_replace = [
    local.vm_id,
    data.coder_workspace.me.transition,
    coder_agent.main.token,
  ]

  provisioner "local-exec" {
    interpreter = ["/bin/sh"]
    command     = "${path.module}/pve-oci-env.sh"
    environment = {
      PVE_API_URL    = var.proxmox_endpoint
      PVE_API_TOKEN  = var.proxmox_api_token
      PVE_INSECURE   = var.proxmox_insecure ? "1" : "0"
      PVE_CA_FILE    = var.proxmox_ca_file
      PVE_NODE       = var.node_name
      PVE_VMID       = local.vm_id
      PVE_TRANSITION = data.coder_workspace.me.transition
      PVE_CT_ENV     = join("\n", [for k, v in local.workspace_env : "${k}=${v}"])
    }
  }
}

resource "coder_metadata" "container" {
  count       = data.coder_workspace.me.start_count
  resource_id = local.container_id
  item {
    key   = "node"
    value = var.node_name
  }
  item {
    key   = "vmid"
    value = local.vm_id
  }
  item {
    key   = "route"
    value = var.route
  }
}
