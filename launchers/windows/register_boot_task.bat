@echo off
rem (Re)create the Task Scheduler task that resumes so8t_exp training.
rem   register_boot_task.bat            at logon of the current user (default): the user's
rem                                     Python, model cache and audio device are available
rem   register_boot_task.bat /startup   at system startup as SYSTEM (no sound to the user,
rem                                     SYSTEM's own Python paths and Hugging Face cache)
rem Needs administrator rights. Asks nothing; prints the task and how to remove it.
setlocal EnableExtensions
chcp 65001 >nul
set "TASK=so8t_exp resume"
for %%I in ("%~dp0.") do set "HERE=%%~fI"
set "MODE=logon"
if /i "%~1"=="/startup" set "MODE=startup"

net session >nul 2>&1
if errorlevel 1 (
  echo error: administrator rights needed. Open an elevated prompt ^(Run as administrator^) and run:
  echo   "%~f0" %*
  exit /b 1
)

set "ACTION=wscript.exe \"%HERE%\run_hidden.vbs\""
if /i "%MODE%"=="startup" (
  schtasks /Create /F /TN "%TASK%" /TR "%ACTION%" /SC ONSTART /RU SYSTEM /DELAY 0001:00
) else (
  schtasks /Create /F /TN "%TASK%" /TR "%ACTION%" /SC ONLOGON /RU "%USERDOMAIN%\%USERNAME%" /IT /DELAY 0000:30
)
if errorlevel 1 (
  echo error: schtasks could not create the task "%TASK%".
  exit /b 1
)

schtasks /Query /TN "%TASK%" /V /FO LIST
echo.
echo Task "%TASK%" registered (%MODE%). It runs:
echo   %ACTION%
echo Log: "%HERE%\..\..\logs\resume_at_boot.log"
echo Remove it with:
echo   schtasks /Delete /TN "%TASK%" /F
exit /b 0
