# Coder template: one Proxmox VE container per workspace, running an
# agent-native Hakim image (hakim-init as PID 1 starts the Coder agent from
# CODER_AGENT_URL and CODER_AGENT_TOKEN). Walk-through: docs/proxmox.md.
#
# Needs Proxmox VE 9.1+ (OCI images, `env`, host-managed NICs) and an API token
# allowed to pull images into `template_datastore` and to create containers.
#
# Two ways to get the image onto the node, chosen by `rootfs_template`:
# - empty (default): the node pulls `image` from its registry
#   (proxmox_oci_image, the API's oci-registry-pull) and creates an OCI
#   application container from it;
# - a volume id such as "local:vztmpl/hakim-base-trixie-amd64.tar.zst": a rootfs
#   template made by hakim-convert --inject-init and uploaded beforehand.
#
# First build on the OCI route: Proxmox replaces the environment given at
# creation with the image's own (bpg/terraform-provider-proxmox#2789), so the
# agent can only start after the next build (start, restart or update), which
# writes `environment_variables` again and reboots the container. The rootfs
# route keeps the creation-time environment.

terraform {
  required_providers {
    coder = {
      source  = "coder/coder"
      version = ">= 2.0"
    }
    proxmox = {
      source = "bpg/proxmox"
      # proxmox_oci_image, environment_variables and host_managed.
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

variable "node_name" {
  type        = string
  default     = "pve"
  description = "Node the workspaces run on"
}

variable "template_datastore" {
  type        = string
  default     = "local"
  description = "Storage with the 'vztmpl' content type, where pulled images land"
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

variable "image" {
  type        = string
  description = "Agent-native image with a tag, e.g. ghcr.io/OWNER/hakim-base:native (images/agent-native or hakim-convert --inject-init --push)"
}

variable "rootfs_template" {
  type        = string
  default     = ""
  description = "Use this uploaded rootfs template instead of pulling `image` (empty: pull)"
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
  pull     = var.rootfs_template == ""
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

# The node pulls the image itself (skopeo copy to an OCI archive). One file
# per workspace, so workspaces never delete or overwrite each other's.
resource "proxmox_oci_image" "hakim" {
  count          = local.pull ? 1 : 0
  node_name      = var.node_name
  datastore_id   = var.template_datastore
  reference      = var.image
  file_name      = "hakim-${data.coder_workspace.me.id}.tar"
  upload_timeout = 1800
}

resource "proxmox_virtual_environment_container" "workspace" {
  node_name   = var.node_name
  description = "Coder workspace ${data.coder_workspace_owner.me.name}/${data.coder_workspace.me.name}"
  tags        = ["coder", "hakim"]

  # The container outlives a stop (the home directory is on its root disk);
  # Coder's stop transition only shuts it down.
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
    template_file_id = local.pull ? proxmox_oci_image.hakim[0].id : var.rootfs_template
    # Hakim images are Debian: Proxmox keeps hostname and /etc/hosts right.
    type = "debian"
  }

  # An OCI container's init is its entrypoint, not a getty: attach the
  # console to /dev/console. Proxmox sets this for OCI images anyway; saying
  # it here keeps the provider from switching it back to "tty".
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

  # What hakim-init reads (docs/init.md). The token changes with every build;
  # a change reboots the container so the new value reaches PID 1.
  environment_variables = {
    CODER_AGENT_URL     = data.coder_workspace.me.access_url
    CODER_AGENT_TOKEN   = coder_agent.main.token
    CODER_USER          = "coder"
    START_DOCKER_DAEMON = "1"
    START_XVFB          = "0"
  }

  lifecycle {
    # A new image must not replace (and so wipe) running workspaces; rebuild
    # a workspace deliberately to move it to a new image.
    ignore_changes = [operating_system[0].template_file_id]
  }
}

resource "coder_metadata" "container" {
  count       = data.coder_workspace.me.start_count
  resource_id = proxmox_virtual_environment_container.workspace.id
  item {
    key   = "node"
    value = var.node_name
  }
  item {
    key   = "vmid"
    value = proxmox_virtual_environment_container.workspace.vm_id
  }
}
